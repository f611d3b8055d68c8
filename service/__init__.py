"""Host side: build, launch and watch the training container and the tracking server."""

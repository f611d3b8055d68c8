"""An example user package for the job image: `-P model=yourpkg.YourModule` names its LightningModule."""

from yourpkg.model import YourModule

__all__ = ["YourModule"]

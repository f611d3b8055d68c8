"""What `lr-finder deploy` writes: the committed Kubernetes and Slurm templates filled in, without a cluster.

Pure: templates and MLproject come in as text or parsed YAML, the filled-in files go out as text.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Mapping
from typing import Any

import yaml

from service.deploy_target import BASE_PARAMS, ENTRY_COMMANDS, DeployError, Target, job_args, param_args

# Parameters MLflow's Kubernetes backend cannot take from the root MLproject: the hardware ones are baked in; the
# study's stages get entry points of their own. It also passes the command's words shell-quoted and without a
# shell, so a default that needs quoting ('' or {}) would reach the job with its quotes: those are left out too
# (quoted_defaults).
STUDY_PARAMS = ("stage", "parent_run", "member", "parallel")
BACKEND_DROPPED = ("accelerator", "devices", "num_nodes", *STUDY_PARAMS)
_COMMAND = re.compile(r"python -m mlproject (\S+)((?: --[a-z-]+ \{[a-z_]+\})*)")


def _container_env(env: list[dict[str, Any]], target: Target) -> None:
    """The experiment's value and the Secret's name in a container's env list, in place."""
    for var in env:
        if var["name"] == "MLFLOW_EXPERIMENT_NAME":
            var["value"] = target.experiment
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            ref["name"] = target.secret


def _pod(pod: dict[str, Any], container: dict[str, Any], target: Target) -> None:
    """The pod-level parts shared by the Job manifests: the dataset's PersistentVolumeClaim when asked for."""
    if target.data_claim:
        claim = {"claimName": target.data_claim, "readOnly": True}
        pod.setdefault("volumes", []).append({"name": "data", "persistentVolumeClaim": claim})
        container.setdefault("volumeMounts", []).append({"name": "data", "mountPath": "/data", "readOnly": True})


def _metadata(doc: dict[str, Any], target: Target) -> None:
    """Name and namespace of a manifest."""
    doc["metadata"]["name"] = target.name
    doc["metadata"]["namespace"] = target.namespace


def indexed_job(docs: list[dict[str, Any]], target: Target) -> list[dict[str, Any]]:
    """deploy/kubernetes/indexed-job.yaml (a headless Service, then the Job) filled in."""
    service, job = copy.deepcopy(docs)
    _metadata(service, target)
    _metadata(job, target)
    service["spec"]["selector"]["batch.kubernetes.io/job-name"] = target.name
    job["spec"]["completions"] = job["spec"]["parallelism"] = target.nodes
    pod = job["spec"]["template"]["spec"]
    pod["subdomain"] = target.name
    container = pod["containers"][0]
    container["image"] = target.image
    port = container["ports"][0]["containerPort"]
    container["command"] = [
        "torchrun",
        f"--nnodes={target.nodes}",
        f"--nproc-per-node={target.gpus}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={target.name}-0.{target.name}",
        f"--master-port={port}",
        "-m",
        "mlproject",
        *job_args(target),
    ]
    container["resources"]["limits"]["nvidia.com/gpu"] = target.gpus
    _container_env(container["env"], target)
    _pod(pod, container, target)
    return [service, job]


def trainjob(doc: dict[str, Any], target: Target) -> dict[str, Any]:
    """deploy/kubernetes/trainjob.yaml (Kubeflow Trainer) filled in."""
    job = copy.deepcopy(doc)
    _metadata(job, target)
    trainer = job["spec"]["trainer"]
    trainer.update(image=target.image, numNodes=target.nodes, numProcPerNode=target.gpus)
    trainer["command"] = ["torchrun", "-m", "mlproject", *job_args(target)]
    trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] = target.gpus
    _container_env(trainer["env"], target)
    if target.data_claim:
        pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        pod_spec = pod["template"]["spec"]["template"]["spec"]
        _pod(pod_spec, pod_spec["containers"][0], target)
    return job


def backend_job_template(doc: dict[str, Any], target: Target) -> dict[str, Any]:
    """deploy/kubernetes/mlflow-backend/job-template.yaml filled in (MLflow sets name, image and command itself)."""
    job = copy.deepcopy(doc)
    _metadata(job, target)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["resources"]["limits"]["nvidia.com/gpu"] = target.gpus
    _container_env(container["env"], target)
    _pod(pod, container, target)
    return job


def backend_config(target: Target, template_path: str) -> dict[str, str]:
    """kubernetes_config.json for `mlflow run --backend kubernetes`; repository-uri only matters with --build-image."""
    repository = re.sub(r"(@sha256:[0-9a-f]+|:[\w][\w.-]*)$", "", target.image)
    return {"kube-job-template-path": template_path, "repository-uri": repository}


def quoted_defaults(spec: Mapping[str, Any]) -> set[str]:
    """The entry point's parameters whose default MLflow's backend would hand over with shell quotes."""
    defaults = {name: str(declared.get("default", "")) for name, declared in spec["parameters"].items()}
    return {name for name, value in defaults.items() if shlex.quote(value) != value}


def backend_project(root: Mapping[str, Any], target: Target) -> dict[str, Any]:
    """The backend's MLproject, derived from the root one: docker_env, and each command under torchrun on one pod."""
    dropped = set(BACKEND_DROPPED) | quoted_defaults(root["entry_points"][target.entry])
    for key, value in target.params:
        if key in dropped:
            raise DeployError("-P", f"{key}: not taken by the backend project (see BACKEND_DROPPED)")
        if shlex.quote(value) != value:  # MLflow would hand the job the value with its quotes
            raise DeployError("-P", f"{key}={value!r}: the backend passes only words without spaces or quotes")
    points = root["entry_points"]
    derived = {entry: _backend_entry(entry, points[entry], target) for entry in ENTRY_COMMANDS}
    compare = derived["compare"]
    derived["study_plan"] = {"parameters": compare["parameters"], "command": compare["command"] + " --stage plan"}
    derived["study_member"] = {
        "parameters": {**compare["parameters"], "parent_run": {"type": "string"}, "member": {"type": "string"}},
        "command": compare["command"] + " --stage member --parent-run {parent_run} --member {member}",
    }
    return {"name": root["name"], "docker_env": {"image": target.image}, "entry_points": derived}


def _backend_entry(entry: str, spec: Mapping[str, Any], target: Target) -> dict[str, Any]:
    """One entry point: the root's parameters less the dropped ones (defaults from -P), its command under torchrun."""
    found = _COMMAND.fullmatch(spec["command"])
    if not found:
        raise DeployError("MLproject", f"{entry}'s command is not `python -m mlproject CMD --opt {{param}} ...`")
    pairs = re.findall(r"--([a-z-]+) \{([a-z_]+)\}", found.group(2))
    dropped = set(BACKEND_DROPPED) | quoted_defaults(spec)
    kept = [f"--{option} {{{param}}}" for option, param in pairs if param not in dropped]
    overrides = {**BASE_PARAMS[entry], **(dict(target.params) if entry == target.entry else {})}
    parameters = {
        name: {**declared, "default": _typed(overrides.get(name, declared.get("default")), declared)}
        for name, declared in spec["parameters"].items()
        if name not in dropped
    }
    launch = f"torchrun --standalone --nproc-per-node {target.gpus} -m mlproject {found.group(1)}"
    return {
        "parameters": parameters,
        "command": " ".join([launch, *kept, f"--accelerator gpu --devices {target.gpus}"]),
    }


def _typed(value: Any, declared: Mapping[str, Any]) -> Any:
    """A default in the parameter's MLproject type, so that the file reads like the root MLproject."""
    kind = declared.get("type", "string")
    return {"int": int, "float": float}[kind](value) if kind in ("int", "float") else str(value)


def sbatch(text: str, target: Target, time: str) -> str:
    """deploy/slurm/lr-finder.sbatch filled in: #SBATCH sizes, default image and experiment, the job's arguments."""
    args = " ".join(shlex.quote(word) for word in param_args(target))
    edits = [
        (r"^#SBATCH --nodes=\S+$", f"#SBATCH --nodes={target.nodes}"),
        (r"^#SBATCH --ntasks-per-node=\S+$", f"#SBATCH --ntasks-per-node={target.gpus}"),
        (r"^#SBATCH --gpus-per-node=\S+$", f"#SBATCH --gpus-per-node={target.gpus}"),
        (r"^#SBATCH --time=\S+$", f"#SBATCH --time={time}"),
        (r"^IMAGE=\$\{LR_FINDER_IMAGE:-[^}]*\}$", f"IMAGE=${{LR_FINDER_IMAGE:-{target.image}}}"),
        (
            r"^export MLFLOW_EXPERIMENT_NAME=\$\{MLFLOW_EXPERIMENT_NAME:-[^}]*\}$",
            f"export MLFLOW_EXPERIMENT_NAME=${{MLFLOW_EXPERIMENT_NAME:-{shlex.quote(target.experiment)}}}",
        ),
        (r"^JOB_ARGS=\(.*\)$", f"JOB_ARGS=({args})"),
        (r"-m mlproject \S+ --accelerator", f"-m mlproject {ENTRY_COMMANDS[target.entry]} --accelerator"),
    ]
    for pattern, line in edits:
        text = _replace_line(text, pattern, line)
    return text


def _replace_line(text: str, pattern: str, line: str) -> str:
    """The one match of pattern replaced by line, taken literally; DeployError when the template lost it."""
    new, count = re.subn(pattern, lambda _match: line, text, flags=re.MULTILINE)
    if count != 1:
        raise DeployError("deploy/slurm/lr-finder.sbatch", f"no longer one line matching {pattern}")
    return new


class _Dumper(yaml.SafeDumper):
    """Safe YAML without anchors: the entry points that share parameters each list them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(docs: list[Any], header: str, flow_leaves: bool = False) -> str:
    """YAML documents under a comment header; long commands stay on one line; flow_leaves: {type: int, ...}."""
    body = yaml.dump_all(
        docs, Dumper=_Dumper, sort_keys=False, default_flow_style=None if flow_leaves else False, width=1_000_000
    )
    return "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + body

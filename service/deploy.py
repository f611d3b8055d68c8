"""What `lr-finder deploy` writes: the committed Kubernetes, Slurm and CI templates filled in, without a cluster.

Pure: templates and MLproject come in as text or parsed YAML, the filled-in files go out as text.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

Params = tuple[tuple[str, str], ...]  # -P key=value pairs, in order

# MLproject entry point -> the job's command (python -m mlproject COMMAND).
ENTRY_COMMANDS = {"main": "train", "lr_find": "lr-find", "compare": "compare"}
# What each entry point runs with unless -P says otherwise: a cluster job is there to train with the suggestion.
BASE_PARAMS: dict[str, dict[str, str]] = {"main": {"auto_lr": "true"}, "lr_find": {}, "compare": {}}
# Set from the hardware options, so that processes, GPUs and the job's own count cannot disagree.
RESERVED = {"accelerator": "--gpus-per-node", "devices": "--gpus-per-node", "num_nodes": "--nodes"}
# Parameters MLflow's Kubernetes backend cannot take from the root MLproject: the hardware ones are baked in; the
# study's stages get entry points of their own. It also passes the command's words shell-quoted and without a
# shell, so a default that needs quoting ('' or {}) would reach the job with its quotes: those are left out too
# (quoted_defaults).
STUDY_PARAMS = ("stage", "parent_run", "member", "parallel")
BACKEND_DROPPED = ("accelerator", "devices", "num_nodes", *STUDY_PARAMS)
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,48}[a-z0-9])?")  # room for the pods' -<index>-<suffix>
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # a Secret's or a claim's name
_IMAGE = re.compile(r"[a-z0-9][a-z0-9._/:-]*(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?")
_SLURM_IMAGE = re.compile(r"[\w./:#@+-]+")  # a squashfs path or a pyxis reference (registry#image:tag)
_SLURM_TIME = re.compile(r"\d+(:\d{2}){0,2}|\d+-\d{1,2}(:\d{2}){0,2}")  # Slurm's six forms of --time
_PARAM_KEY = re.compile(r"[a-z][a-z0-9_]*")
_COMMAND = re.compile(r"python -m mlproject (\S+)((?: --[a-z-]+ \{[a-z_]+\})*)")


class DeployError(ValueError):
    """A value the files cannot be written with: which option (or file) to change, and how."""

    def __init__(self, option: str, detail: str) -> None:
        self.option, self.detail = option, detail
        super().__init__(f"{option}: {detail}")


@dataclass(frozen=True)
class Target:
    """Where and what to run: the values every template is filled in with."""

    image: str
    nodes: int = 1
    gpus: int = 1  # per node
    experiment: str = "lr-finder"
    secret: str = "lr-finder-tracking"
    name: str = "lr-finder"
    namespace: str = "default"
    entry: str = "main"
    params: Params = ()  # checked against MLproject
    data_claim: str = ""


@dataclass(frozen=True)
class Study:
    """study.json as the plan stage writes it: the parent run and one label per member."""

    parent_run: str
    members: tuple[str, ...]


def check_name(option: str, value: str, subdomain: bool = False) -> str:
    """A Kubernetes object name: a DNS label (Job, Service, namespace) or subdomain (Secret, claim)."""
    if not (_DNS_SUBDOMAIN if subdomain else _DNS_LABEL).fullmatch(value):
        raise DeployError(option, f"{value!r}: lower-case letters, digits and '-' (and '.' in a Secret's name)")
    return value


def check_image(option: str, value: str, slurm: bool = False) -> str:
    """An image reference (a squashfs path or pyxis reference for Slurm), safe to write into YAML or bash."""
    if not (_SLURM_IMAGE if slurm else _IMAGE).fullmatch(value):
        example = "/shared/lr-finder.sqsh or host#lr-finder:tag" if slurm else "registry.example.com/lr-finder:tag"
        raise DeployError(option, f"{value!r}: pass an image reference such as {example}")
    return value


def check_time(option: str, value: str) -> str:
    """Slurm's --time: minutes[:seconds], hours:minutes:seconds, or days-hours[:minutes[:seconds]]."""
    if not _SLURM_TIME.fullmatch(value):
        raise DeployError(option, f"{value!r}: pass HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00")
    return value


def check_params(items: Iterable[str], entry: str, declared: Mapping[str, Mapping[str, Any]]) -> Params:
    """-P key=value against the entry point's MLproject parameters: known, not set elsewhere, of the right type."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _PARAM_KEY.fullmatch(key) or "\n" in value:
            raise DeployError("-P", f"{item!r}: expected key=value, e.g. -P epochs=8")
        if key in RESERVED:
            raise DeployError("-P", f"{key}: set by {RESERVED[key]}")
        if key not in declared:
            raise DeployError("-P", f"{key}: not a parameter of entry point {entry} (see MLproject)")
        kind = declared[key].get("type", "string")
        try:
            {"int": int, "float": float}.get(kind, str)(value)
        except ValueError:
            raise DeployError("-P", f"{item!r}: {key} is a{'n' if kind == 'int' else ''} {kind} in MLproject") from None
        pairs.append((key, value))
    return tuple(pairs)


def param_args(target: Target) -> list[str]:
    """The entry's parameters as the job's options (x_y -> --x-y), the base ones first."""
    values = {**BASE_PARAMS[target.entry], **dict(target.params)}
    return [word for key, value in values.items() for word in ("--" + key.replace("_", "-"), value)]


def job_args(target: Target) -> list[str]:
    """The job's command line after `-m mlproject`: the entry's command, its parameters, then the hardware."""
    hardware = ["--accelerator", "gpu", "--devices", str(target.gpus), "--num-nodes", str(target.nodes)]
    return [ENTRY_COMMANDS[target.entry], *param_args(target), *hardware]


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


def read_study(text: str) -> Study:
    """study.json, checked: a parent run id and at least one member label."""
    try:
        data = json.loads(text)
        study = Study(str(data["parent_run"]), tuple(str(m) for m in data["members"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise DeployError("--study", f"not a study.json ({{'parent_run': ID, 'members': [...]}}): {exc}") from None
    if not re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", study.parent_run) or not study.members:
        raise DeployError("--study", "needs a parent_run id and at least one member")
    return study


def github_outputs(study: Study) -> str:
    """Lines for $GITHUB_OUTPUT: the parent run, and the members as a JSON list for a matrix."""
    return f"parent_run={study.parent_run}\nmembers={json.dumps(list(study.members))}\n"


def gitlab_child(pipeline: Mapping[str, Any], study: Study) -> dict[str, Any]:
    """A child pipeline for the members: the parent's hidden jobs, the parent run, one matrix job per member."""
    hidden = {key: copy.deepcopy(value) for key, value in pipeline.items() if key.startswith(".")}
    if ".study-member" not in hidden:
        raise DeployError("--pipeline", "no hidden job .study-member to run the members with")
    member = {"extends": ".study-member", "parallel": {"matrix": [{"MEMBER": list(study.members)}]}}
    return {"variables": {"PARENT_RUN": study.parent_run}, **hidden, "study-member": member}


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

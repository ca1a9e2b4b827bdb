"""cluster/: the KubeRay manifests, the `ray up` config and the image are deployable as written.

The manifests are validated strictly against the KubeRay CRDs (read from ../shared/schemas/kuberay,
never copied here): as `kubeconform -strict` does, an unknown field anywhere is an error. The
entrypoints must name a module, a command and a config that exist, the config must be copied
into the image, and every container must run the one image named in cluster.manifests.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from cluster.manifests import IMAGE, iter_containers, load_manifest, render_rayjob
from replaceme.cli import build_parser
from replaceme.config import load_config

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_DIR = ROOT.parent / "shared" / "schemas" / "kuberay"
MANIFESTS = ["raycluster.yaml", "rayjob.yaml", "raycronjob.yaml"]
# KubeRay's own limits: names feed the generated cluster, Service and child-RayJob names.
NAME_MAX = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
SAMPLE_DATE = "20260104"  # what `$(date -u +%Y%m%d)` in an entrypoint expands to

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR} "
                                "(they live beside the repository, in shared/schemas/kuberay)")


# --- CRD openAPIV3Schema -> strict JSON schema ---------------------------------------------------

DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"  # object names KubeRay derives Services from
DNS1123_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}  # namespaces
LABELS = {"type": "object",
          "propertyNames": {"pattern": r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"},
          "additionalProperties": {"type": "string", "maxLength": 63,
                                   "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}}
ANNOTATIONS = {"type": "object", "additionalProperties": {"type": "string"}}


def object_meta(name: dict | None = None) -> dict:
    """The part of ObjectMeta a manifest may set (the CRDs leave metadata as a bare object)."""
    return {"type": "object", "additionalProperties": False,
            "properties": {"name": name or {"type": "string"}, "labels": LABELS, "annotations": ANNOTATIONS,
                           "namespace": DNS1123_LABEL}}


def strict(node: dict, name: str = "") -> dict:
    """A JSON schema that rejects fields the CRD does not declare (like kubeconform -strict)."""
    if name == "metadata" and node.get("type") == "object" and not {"properties", "additionalProperties"} & node.keys():
        return object_meta()  # an embedded pod template's ObjectMeta
    nested = ("properties", "items", "additionalProperties", "anyOf", "allOf")
    schema = {k: v for k, v in node.items() if k not in nested}
    if node.get("x-kubernetes-int-or-string"):  # quantities, ports: a number or a string
        schema["type"] = ["integer", "string"]
    elif node.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    if "properties" in node:
        schema["properties"] = {key: strict(sub, key) for key, sub in node["properties"].items()}
    if "items" in node:
        schema["items"] = strict(node["items"])
    for key in ("anyOf", "allOf"):
        if key in node and not node.get("x-kubernetes-int-or-string"):
            schema[key] = [strict(sub) for sub in node[key]]
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        schema["additionalProperties"] = strict(extra)
    elif extra is not None:
        schema["additionalProperties"] = extra
    elif "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def crd_validator(kind: str):
    """A validator for ``kind`` at the CRD's storage version (v1), apiVersion and kind pinned."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        if crd["spec"]["names"]["kind"] == kind:
            break
    else:
        raise AssertionError(f"no CRD for kind {kind} in {CRD_DIR}")
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    assert version["name"] == "v1", f"{kind}: storage version is {version['name']}, the manifests use v1"
    schema = strict(version["schema"]["openAPIV3Schema"])
    name = {"type": "string", "pattern": DNS1035_LABEL, "maxLength": NAME_MAX[kind]}
    schema["properties"].update(apiVersion={"const": f"{crd['spec']['group']}/v1"}, kind={"const": kind},
                                metadata=object_meta(name))
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["metadata"]["required"] = ["name"]
    return jsonschema.Draft202012Validator(schema)


def crd_errors(manifest: dict) -> list[str]:
    errors = crd_validator(manifest["kind"]).iter_errors(manifest)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# --- the CRDs --------------------------------------------------------------------------------------


@needs_crds
@pytest.mark.parametrize("filename", MANIFESTS)
def test_manifest_is_valid_under_its_crd(filename):
    manifest = load_manifest(filename)
    assert crd_errors(manifest) == []


@needs_crds
def test_rendered_rayjob_is_valid_and_runs_the_given_image_and_command():
    job = render_rayjob(name="rm-llama-70b-0042", entrypoint="python -m replaceme calibrate --config job.yaml",
                        image="registry.example/replaceme:test", namespace="ml-pipelines")
    assert crd_errors(job) == []
    assert job["metadata"]["name"] == "rm-llama-70b-0042"
    assert job["metadata"]["namespace"] == "ml-pipelines"
    assert job["spec"]["entrypoint"] == "python -m replaceme calibrate --config job.yaml"
    images = [c["image"] for c in iter_containers(job)]
    assert len(images) == 3 and set(images) == {"registry.example/replaceme:test"}  # head, worker, submitter


def test_rendered_rayjob_keeps_the_release_image_and_the_template():
    job = render_rayjob(name="replaceme-a", entrypoint="python -m replaceme run --config x.yaml")
    assert {c["image"] for c in iter_containers(job)} == {IMAGE}
    assert "namespace" not in job["metadata"]
    template = load_manifest("rayjob.yaml")
    assert job["spec"]["rayClusterSpec"] == template["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name", ["Replaceme", "9-replaceme", "replaceme-", "r" * 48, "rm_job"])
def test_render_rayjob_refuses_names_kuberay_would_reject(name):
    with pytest.raises(ValueError, match="DNS-1035"):
        render_rayjob(name=name, entrypoint="python -m replaceme run --config x.yaml")


MISSPELLINGS = {
    "spec.rayClusterSpecc": lambda job: job["spec"].update(rayClusterSpecc=job["spec"]["rayClusterSpec"]),
    "workerGroupSpecs[0].replica": lambda job: job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replica=2),
    "container.resource": lambda job: job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    ["containers"][0].update(resource={"limits": {"cpu": "1"}}),
    "metadata.lables": lambda job: job["metadata"].update(lables={"a": "b"}),
    "template.metadata.label": lambda job: job["spec"]["submitterPodTemplate"]["metadata"].update(label={"a": "b"}),
}


@needs_crds
@pytest.mark.parametrize("where", list(MISSPELLINGS))
def test_strict_validation_rejects_a_misspelled_field(where):
    job = load_manifest("rayjob.yaml")
    MISSPELLINGS[where](job)
    errors = crd_errors(job)
    field = where.rsplit(".", 1)[-1]
    assert errors and all("Additional properties are not allowed" in e for e in errors), errors
    assert any(f"'{field}'" in e for e in errors), errors


@needs_crds
@pytest.mark.parametrize("value, ok", [("900Gi", True), (8, True), ("1.5", True), ("lots", False), ("9 GB", False)])
def test_quantities_are_checked(value, ok):
    job = load_manifest("rayjob.yaml")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["resources"]["limits"]["memory"] = value
    assert (crd_errors(job) == []) == ok


@needs_crds
def test_a_wrong_kind_or_version_is_rejected():
    job = load_manifest("rayjob.yaml")
    job["apiVersion"] = "ray.io/v1alpha1"
    assert any("apiVersion" in e for e in crd_errors(job))


# --- one cluster shape, one image --------------------------------------------------------------


def test_the_three_manifests_describe_the_same_cluster_and_job():
    cluster, job, cron = (load_manifest(name) for name in MANIFESTS)
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    template = cron["spec"]["jobTemplate"]
    assert {k: v for k, v in template.items() if k != "entrypoint"} == \
           {k: v for k, v in job["spec"].items() if k != "entrypoint"}


@pytest.mark.parametrize("filename, count", [("raycluster.yaml", 2), ("rayjob.yaml", 3), ("raycronjob.yaml", 3)])
def test_every_container_runs_the_release_image(filename, count):
    images = [c["image"] for c in iter_containers(load_manifest(filename))]
    assert images == [IMAGE] * count


def test_head_has_no_gpus_and_workers_get_theirs_from_container_limits():
    spec = load_manifest("raycluster.yaml")["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in iter_containers(head))
    for group in spec["workerGroupSpecs"]:
        assert "num-gpus" not in group.get("rayStartParams", {})
        (worker,) = group["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] > 0
        mounts = {m["mountPath"] for m in worker["volumeMounts"]}
        assert "/dev/shm" in mounts


def test_ray_version_is_the_one_the_image_installs():
    pinned = dockerfile_args()["RAY_VERSION"]
    for filename in MANIFESTS:
        spec = load_manifest(filename)["spec"]
        spec = spec.get("jobTemplate", spec).get("rayClusterSpec", spec)
        assert spec["rayVersion"] == pinned, filename


# --- entrypoints ---------------------------------------------------------------------------------


def entrypoint_of(filename: str) -> str:
    spec = load_manifest(filename)["spec"]
    return spec.get("jobTemplate", spec)["entrypoint"]


@pytest.mark.parametrize("filename", ["rayjob.yaml", "raycronjob.yaml"])
def test_entrypoint_runs_a_config_that_the_image_holds(filename):
    argv = shlex.split(re.sub(r"\$\([^)]*\)", SAMPLE_DATE, entrypoint_of(filename)))  # as the submitting shell does
    assert argv[:3] == ["python", "-m", "replaceme"]
    assert importlib.util.find_spec("replaceme.__main__") is not None
    args = build_parser().parse_args(argv[3:])
    assert args.command == "run"
    in_repo = repo_path_of(args.config)
    assert in_repo is not None, f"{args.config} is not under a folder that cluster/Dockerfile copies"
    assert in_repo.is_file(), f"{args.config} is copied from {in_repo}, which does not exist"
    assert not dockerignored(in_repo.relative_to(ROOT)), f"{in_repo} is excluded by .dockerignore"
    config = load_config(in_repo, args.overrides)
    assert config.engine.backend == "ray" and config.engine.address == "auto"


def test_cron_runs_are_kept_apart_by_date():
    argv = shlex.split(re.sub(r"\$\([^)]*\)", SAMPLE_DATE, entrypoint_of("raycronjob.yaml")))
    args = build_parser().parse_args(argv[3:])
    config = load_config(repo_path_of(args.config), args.overrides)
    assert config.run_id == f"weekly-{SAMPLE_DATE}"
    assert config.output_dir.endswith(f"/{SAMPLE_DATE}")


def test_the_70b_config_fits_the_worker_group():
    config = load_config(CLUSTER / "configs" / "llama-70b.yaml")
    job = load_manifest("rayjob.yaml")["spec"]
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    e = config.engine
    per_pipeline = e.stages * e.gpus_per_stage
    free_gpus = [limits["nvidia.com/gpu"]] * group["replicas"]
    free_gpus[0] -= job["entrypointNumGpus"]  # the driver's GPU
    pipelines_per_node = [int(free // per_pipeline) for free in free_gpus]
    assert e.replicas <= sum(pipelines_per_node), "each pipeline should fit inside one node"
    assert max(pipelines_per_node) * e.stages * e.cpus_per_stage <= int(limits["cpu"])
    assert config.activations.uri and config.model_path.startswith("s3://")
    assert config.mlflow.tracking_uri == "http://mlflow.mlflow.svc:5000"


# --- the image -------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(word.upper(), rest.strip()) for word, _, rest in (line.partition(" ") for line in lines)]


def dockerfile_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in dockerfile_instructions() if word == "ARG" and "=" in rest)


def dockerfile_copies() -> list[tuple[list[str], PurePosixPath]]:
    """(sources, destination in the image) of every COPY, destinations resolved against WORKDIR."""
    workdir, copies = PurePosixPath("/"), []
    for word, rest in dockerfile_instructions():
        if word == "WORKDIR":
            workdir = workdir / rest
        elif word == "COPY":
            *sources, dest = [arg for arg in rest.split() if not arg.startswith("--")]
            copies.append((sources, workdir / dest))
    return copies


def repo_path_of(image_path: str) -> Path | None:
    """The repository file that cluster/Dockerfile copies to ``image_path``, if any."""
    for sources, dest in dockerfile_copies():
        for source in sources:
            if source.endswith("/") and PurePosixPath(image_path).is_relative_to(dest):
                return ROOT / source / PurePosixPath(image_path).relative_to(dest)
    return None


def dockerignored(path: Path) -> bool:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    parts = path.as_posix().split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
               for pattern in patterns for prefix in prefixes)


def test_dockerfile_copies_what_exists_and_is_not_ignored():
    copies = dockerfile_copies()
    assert copies, "cluster/Dockerfile copies nothing"
    for sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(Path(source.rstrip("/"))), f"COPY {source}: excluded by .dockerignore"
    copied = {s.rstrip("/") for sources, _ in copies for s in sources}
    assert {"pyproject.toml", "replaceme", "ops", "pipelines", "cluster", "examples"} <= copied


def test_dockerfile_installs_extras_that_exist():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN" and "pip install" in rest)
    wanted = re.search(r'"\.\[([^\]]+)\]"', installs)
    assert wanted, "the Dockerfile should pip install the project with its extras"
    installed = set(wanted.group(1).split(","))
    assert installed <= set(extras)
    # every extra a step can use (eval: lm-eval in evaluate; hf: datasets for calibration text); not the tests'
    assert installed == set(extras) - {"test"}, f"cluster/Dockerfile installs {sorted(installed)}, not every extra"


def test_package_data_ships_every_manifest_and_config():
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["cluster"]
    for path in CLUSTER.rglob("*.yaml"):
        relative = path.relative_to(CLUSTER).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} would not be installed"
        assert load_manifest(relative) == yaml.safe_load(path.read_text())


# --- ray up ----------------------------------------------------------------------------------------


def ray_schema_path() -> Path:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed: its cluster launcher schema (ray/autoscaler/ray-schema.json) is needed")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    if not path.is_file():
        pytest.skip(f"this Ray has no cluster launcher schema at {path}")
    return path


def ray_up_config() -> dict:
    return yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())


def test_ray_up_config_validates_against_rays_schema():
    schema = json.loads(ray_schema_path().read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(ray_up_config())]
    assert errors == []


def test_ray_up_config_passes_the_launchers_own_checks():
    ray_schema_path()
    util = pytest.importorskip("ray.autoscaler._private.util")  # what `ray up` runs: defaults, then checks
    util.validate_config(util.prepare_config(ray_up_config()))


def test_ray_up_runs_the_release_image_and_syncs_what_the_image_holds():
    config = ray_up_config()
    assert config["docker"]["image"] == IMAGE
    mounted = {PurePosixPath(local).as_posix() for local in config["file_mounts"].values()}
    assert all((ROOT / local).exists() for local in mounted), mounted
    copied = {s.rstrip("/") for sources, _ in dockerfile_copies() for s in sources}
    assert mounted == copied
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0

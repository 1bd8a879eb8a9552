"""The cluster infrastructure (infra/) agrees with itself and with the code it runs.

No Kubernetes here: every manifest is parsed and checked for the fields KubeRay needs; the image,
the cluster shape and the storage settings must be the same everywhere; every RayJob entrypoint
(and every job command in infra/README.md) must name a real job module, a real config file and
only overrides that the job's own config class accepts; the jobs must chain through one bucket
(stage 3 of training from what the merge writes) into the model that the RayService serves; every
RayJob must give up by a deadline; every pod must name the image by its version tag; and the
storage settings, given the way the pods get them (environment variables), must reach an S3
endpoint (moto on loopback).
"""

import importlib
import importlib.util
import posixpath
import re
import shlex
import subprocess
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from jobs.curate import CurateConfig
from jobs.encode import EncodeConfig
from jobs.merge import MergeJobConfig
from jobs.synthesize import SynthesizeConfig
from jobs.train_config import TrainConfig
from omniflow import storage as st
from omniflow.config import load_config
from pipelines.evaluation.config import EvaluateConfig

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
CONFIG_CLASSES = {
    "curate": CurateConfig,
    "synthesize": SynthesizeConfig,
    "encode": EncodeConfig,
    "train": TrainConfig,
    "merge": MergeJobConfig,
    "evaluate": EvaluateConfig,
}
SERVE_IMPORT_PATH = "serve.app:build_app"
SERVE_DEPLOYMENTS = {"Frontend", "Generator"}
SERVE_ARGS = {"model", "device", "dtype", "max_batch_size", "batch_wait_timeout_s"}
GPU = "nvidia.com/gpu"
STAGE3_CONFIG = "configs/train_shapesworld_stage3.yaml"
# Tags that registries move from build to build: a pod must never name one.
MUTABLE_TAGS = {"latest", "stable", "main", "master", "dev", "edge", "nightly"}


# ---- reading ------------------------------------------------------------------------------------


@cache
def manifests() -> tuple[tuple[str, dict], ...]:
    """(file name, document) for every YAML document under infra/kuberay/."""
    out = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.name} holds no document"
        out.extend((path.name, d) for d in docs)
    return tuple(out)


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in manifests() if d.get("kind") == kind]


def the_one(kind: str) -> dict:
    (doc,) = of_kind(kind)
    return doc


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the RayCluster's own, each RayJob's and the RayService's."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for d in of_kind("RayCluster")]
    specs += [(f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in of_kind("RayJob")]
    specs += [(f"RayService {d['metadata']['name']}", d["spec"]["rayClusterConfig"]) for d in of_kind("RayService")]
    return specs


def groups(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group name, rayStartParams, pod template) for the head and each worker group."""
    head = spec["headGroupSpec"]
    out = [("head", head.get("rayStartParams", {}), head["template"])]
    out += [(w["groupName"], w.get("rayStartParams", {}), w["template"]) for w in spec["workerGroupSpecs"]]
    return out


def ray_containers() -> list[tuple[str, dict]]:
    """The Ray container (KubeRay's: the first one) of every pod template of every cluster."""
    return [
        (f"{where} / {name}", template["spec"]["containers"][0])
        for where, spec in cluster_specs()
        for name, _, template in groups(spec)
    ]


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of infra/Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (INFRA / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), " ".join(args.split())))
    return out


def docker(instruction: str) -> list[str]:
    return [args for ins, args in dockerfile() if ins == instruction]


def workdir() -> str:
    (path,) = docker("WORKDIR")
    return path


def built_dirs() -> list[str]:
    """Directories under the image's WORKDIR that the Dockerfile builds (gitignored, so not copied)."""
    return re.findall(r"python -m shapesworld\.toy build-\w+ --out ([^\s;&|]+)", " ".join(docker("RUN")))


def ray_pin() -> str:
    (version,) = re.findall(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.MULTILINE)
    return version


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def image() -> str:
    """The image that raycluster.yaml's head runs; every other pod must run the same."""
    (cluster,) = [d for name, d in manifests() if name == "raycluster.yaml"]
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def runtime_envs() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((INFRA / "runtime_env").glob("*.yaml"))}


# ---- job commands -------------------------------------------------------------------------------


@pytest.fixture
def fake_codec_sets(monkeypatch):
    """Validation as on the cluster, without it. `codec_sets` name directories built into the
    image, absent here: stand in for their codecs.json (the toy codecs' codecs, the toy CLIP's
    pooled encoders) and record which directories the configs asked for. Validating a config must
    not touch storage (the s3:// paths are the cluster's): any attempt fails."""
    import jobs.encode
    import pipelines.evaluation.config

    def no_storage(path, *args, **kwargs):
        raise AssertionError(f"validating a config opened {path}")

    monkeypatch.setattr(st, "filesystem", no_storage)
    asked = []

    def read_codec_set(root):
        asked.append(str(root))
        if posixpath.basename(str(root).rstrip("/")) == "clip":
            clip = {"path": str(root), "model_name": "shapesworld-clip", "config_file": "shapesworld-clip.json",
                    "pretrained": "open_clip_model.safetensors", "pooled_dim": 64}
            tower = {"kind": "mel-vit-audio-pooled", "path": posixpath.join(str(root), "audio_tower"), "pooled_dim": 64}
            return {"codecs": {}, "pooled": {"image": {"kind": "open-clip-image-pooled", **clip},
                                             "text": {"kind": "open-clip-text-pooled", **clip}, "audio": tower}}
        return {"codecs": {"image": {"kind": "image-vae", "path": posixpath.join(str(root), "image_vae"), "resolution": 32},
                           "text": {"kind": "omniflow-text-vae", "path": posixpath.join(str(root), "text_vae")},
                           "audio": {"kind": "mel-vae", "path": posixpath.join(str(root), "audio")}},
                "pooled": {}}

    monkeypatch.setattr(jobs.encode, "read_codec_set", read_codec_set)
    monkeypatch.setattr(pipelines.evaluation.config, "read_codec_set", read_codec_set)
    return asked


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in strings(v)]
    return []


def job_config(tokens: list[str], *, uploaded: bool, where: str):
    """Validate a job command, `python -m jobs.NAME --config FILE key=value ...`, as the job itself
    would, and check that every local file it reads is in the pods (the image's WORKDIR: configs/
    and the built runs/ directories; with `uploaded`, runs/ is not in the working dir)."""
    assert tokens[:2] == ["python", "-m"] and tokens[2].startswith("jobs."), f"{where}: {shlex.join(tokens)}"
    module = tokens[2]
    assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    name = module.removeprefix("jobs.")
    assert name in CONFIG_CLASSES, f"{where}: {module} is not one of the jobs {sorted(CONFIG_CLASSES)}"
    rest = tokens[3:]
    assert rest[0] == "--config", f"{where}: the command gives no --config"
    config_file, overrides = rest[1], rest[2:]
    assert config_file.startswith("configs/") and (ROOT / config_file).is_file(), f"{where}: {config_file}"
    assert all("=" in o and not o.startswith("-") for o in overrides), f"{where}: {overrides}"
    config = load_config(CONFIG_CLASSES[name], str(ROOT / config_file), overrides)

    for value in strings(config.model_dump(mode="json")):
        if "://" in value:
            continue
        relative = value
        if value.startswith("/"):
            assert value.startswith(workdir() + "/"), f"{where}: {value} is outside the image's {workdir()}"
            relative = value[len(workdir()) + 1:]
        elif value.startswith("runs/"):
            assert not uploaded, f"{where}: {value} is not uploaded (runs/ is gitignored); use the image's path"
        if relative.startswith("runs/"):
            assert any(relative == d or relative.startswith(d + "/") for d in built_dirs()), (
                f"{where}: {value} is neither in the image ({built_dirs()}) nor on s3://"
            )
    return name, config


def rayjob_configs() -> dict[str, tuple[str, object]]:
    return {
        job["metadata"]["name"]: job_config(
            shlex.split(job["spec"]["entrypoint"]), uploaded=False, where=f"RayJob {job['metadata']['name']}"
        )
        for job in of_kind("RayJob")
    }


def serve_config() -> dict:
    return yaml.safe_load(the_one("RayService")["spec"]["serveConfigV2"])


def s3_paths(config) -> list[str]:
    return [s for s in strings(config.model_dump(mode="json")) if s.startswith("s3://")]


# ---- the manifests ------------------------------------------------------------------------------


def test_manifests_are_kuberay_v1_objects():
    files = {p.name for p in KUBERAY.glob("*.yaml")}
    expected = {"raycluster.yaml", "rayservice.yaml", "secret-example.yaml", "storage-config.yaml"}
    expected |= {f"rayjob-{job}.yaml" for job in CONFIG_CLASSES} | {"rayjob-train-stage3.yaml"}
    assert expected <= files
    names = []
    for file, doc in manifests():
        kind = doc.get("kind")
        assert doc.get("metadata", {}).get("name"), f"{file}: no metadata.name"
        if file.startswith("ray"):
            assert doc["apiVersion"] == "ray.io/v1", file
            want = {"raycluster": "RayCluster", "rayjob": "RayJob", "rayservice": "RayService"}[Path(file).stem.split("-")[0]]
            assert kind == want, f"{file}: kind {kind}"
            names.append(doc["metadata"]["name"])
        else:
            assert doc["apiVersion"] == "v1" and kind in ("Secret", "ConfigMap"), file
    # KubeRay names each cluster's head Service <name>-head-svc: names must not collide
    assert len(names) == len(set(names)), names


def test_every_cluster_has_the_spec_of_raycluster_yaml():
    (_, base), *others = cluster_specs()
    assert len(others) == len(of_kind("RayJob")) + 1
    for where, spec in others:
        assert spec == base, f"{where} differs from raycluster.yaml"


def test_every_cluster_spec_has_what_kuberay_needs():
    for where, spec in cluster_specs():
        check_cluster_spec(where, spec)


def check_cluster_spec(where: str, spec: dict) -> None:
    assert spec["rayVersion"] == ray_pin(), where
    head = spec["headGroupSpec"]
    assert head["template"]["spec"]["containers"], where
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # so that port-forward reaches it
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == 8265 and ports["serve"] == 8000  # Jobs API; RayService's serve Service

    workers = spec["workerGroupSpecs"]
    assert len({w["groupName"] for w in workers}) == len(workers)
    for w in workers:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(w)
        assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"], w["groupName"]
        assert w["template"]["spec"]["containers"], w["groupName"]
    if any(w["minReplicas"] < w["maxReplicas"] for w in workers):
        assert spec["enableInTreeAutoscaling"] is True, "worker groups scale, but no autoscaler runs"


def test_ray_start_params_match_the_container_resources():
    (_, spec), *_ = cluster_specs()
    gpu_groups = 0
    for name, params, template in groups(spec):
        assert all(isinstance(v, str) for v in params.values()), f"{name}: KubeRay takes rayStartParams as strings"
        container = template["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, f"{name}: requests differ from limits"
        assert "memory" in limits, name
        if name == "head":  # may keep its CPUs from tasks (num-cpus 0), never claim more than it has
            assert 0 <= float(params["num-cpus"]) <= cpus(limits["cpu"])
        else:
            assert float(params["num-cpus"]) == cpus(limits["cpu"]), name
        gpus = int(limits.get(GPU, 0))
        assert int(params.get("num-gpus", "0")) == gpus, name
        if gpus:
            gpu_groups += 1
            tolerated = {t["key"] for t in template["spec"].get("tolerations", [])}
            assert GPU in tolerated, f"{name}: GPU nodes are usually tainted {GPU}"
    assert gpu_groups >= 1
    assert any(GPU not in t["spec"]["containers"][0]["resources"]["limits"] for n, _, t in groups(spec) if n != "head")


def images(value, where: str) -> list[tuple[str, str]]:
    """(where, image) for every `image` field anywhere in a manifest: Ray containers, sidecars,
    submitter pods, the autoscaler."""
    if isinstance(value, dict):
        own = [(where, value["image"])] if isinstance(value.get("image"), str) else []
        return own + [i for k, v in value.items() for i in images(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [i for n, v in enumerate(value) for i in images(v, f"{where}[{n}]")]
    return []


def test_one_image_everywhere():
    name, _, tag = image().rpartition(":")
    assert "@" not in image() and "/" not in tag, f"{image()}: name the image by a tag"
    assert name and tag == pyproject()["project"]["version"], "the image's tag is the package version"
    assert tag not in MUTABLE_TAGS
    found = [i for file, doc in manifests() for i in images(doc, f"{file}:{doc['metadata']['name']}")]
    assert len(found) >= len(ray_containers())
    for where, named in found:
        assert named == image(), where
    for where, container in ray_containers():
        assert container["image"] == image(), where
    for where, spec in cluster_specs():
        assert spec.get("autoscalerOptions", {}).get("image", image()) == image(), where
    readme = (INFRA / "README.md").read_text()
    assert f"-f infra/Dockerfile -t {image()} ." in readme and f"docker push {image()}" in readme


def test_pods_work_in_the_images_project_directory():
    for where, container in ray_containers():
        assert container["workingDir"] == workdir(), where


def test_one_set_of_storage_settings():
    configmap, secret = the_one("ConfigMap"), the_one("Secret")
    env_from = [{"configMapRef": {"name": configmap["metadata"]["name"]}},
                {"secretRef": {"name": secret["metadata"]["name"]}}]
    for where, container in ray_containers():
        assert container["envFrom"] == env_from, where
        assert not [e for e in container.get("env", []) if e["name"].startswith("AWS_")], where
    # the Secret's keys are the variables the storage code reads credentials from
    defaults = st.StorageConfig()
    assert set(secret["stringData"]) == {defaults.access_key_id_env, defaults.secret_access_key_env}
    assert all("REPLACE" in v for v in secret["stringData"].values()), "secret-example.yaml holds placeholders only"
    assert set(configmap["data"]) <= {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION"}
    st.StorageConfig(endpoint_url=configmap["data"]["AWS_ENDPOINT_URL"])  # a valid endpoint
    for name, env in runtime_envs().items():
        env_vars = env.get("env_vars", {})
        assert not {defaults.access_key_id_env, defaults.secret_access_key_env} & set(env_vars), name
        for key, value in env_vars.items():
            if key in configmap["data"]:
                assert value == configmap["data"][key], f"{name}: {key}"


def test_storage_settings_reach_s3_through_the_environment(s3_server, monkeypatch):
    """The pods set no storage fields in the configs: endpoint and region come from the ConfigMap's
    variables, credentials from the Secret's. Those variables alone must route a default
    StorageConfig to the endpoint (here moto's, in place of the ConfigMap's placeholder)."""
    import boto3
    import s3fs

    data = the_one("ConfigMap")["data"]
    for key, value in data.items():
        monkeypatch.setenv(key, s3_server.endpoint_url if key == "AWS_ENDPOINT_URL" else value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        path = s3_server.url("infra", "probe.txt")
        st.write_bytes_atomic(path, b"from the pod's environment", st.StorageConfig())
        body = boto3.client("s3", endpoint_url=s3_server.endpoint_url).get_object(
            Bucket=s3_server.bucket, Key="infra/probe.txt")["Body"].read()
        assert body == b"from the pod's environment"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ---- the jobs -----------------------------------------------------------------------------------


def test_rayjobs_bring_their_own_cluster_and_remove_it():
    jobs = of_kind("RayJob")
    for job in jobs:
        spec, name = job["spec"], job["metadata"]["name"]
        assert isinstance(spec["entrypoint"], str), name
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert "rayClusterSpec" in spec and "clusterSelector" not in spec, name
        assert spec["ttlSecondsAfterFinished"] >= 0, name
        # relative config paths resolve in the image's working directory: nothing may replace it
        assert "working_dir" not in yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), name
    modules = {shlex.split(job["spec"]["entrypoint"])[2] for job in jobs}
    assert modules == {f"jobs.{name}" for name in CONFIG_CLASSES}


def test_every_rayjob_gives_up_by_a_deadline():
    """A RayJob whose pods never come (no GPU nodes) must fail, not wait forever: KubeRay counts
    activeDeadlineSeconds from when it starts bringing the cluster up. Retries are bounded too."""
    jobs = of_kind("RayJob")
    assert jobs
    for job in jobs:
        spec, name = job["spec"], job["metadata"]["name"]
        deadline = spec.get("activeDeadlineSeconds")
        assert isinstance(deadline, int) and not isinstance(deadline, bool) and deadline > 0, (
            f"{name}: activeDeadlineSeconds must be a positive integer, got {deadline!r}")
        assert isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 0, name
        if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            limit = spec.get("submitterConfig", {}).get("backoffLimit")
            assert isinstance(limit, int) and limit >= 0, f"{name}: submitterConfig.backoffLimit, got {limit!r}"


def test_readme_waits_as_long_as_the_jobs_deadline():
    """`kubectl wait` on a RayJob gives up no sooner than the job itself may."""
    deadlines = {job["metadata"]["name"]: job["spec"]["activeDeadlineSeconds"] for job in of_kind("RayJob")}
    units = {"s": 1, "m": 60, "h": 3600}
    waits = 0
    for command in readme_commands():
        tokens = shlex.split(command, comments=True)
        if tokens[:2] != ["kubectl", "wait"]:
            continue
        (job,) = [t.removeprefix("rayjob/") for t in tokens if t.startswith("rayjob/")]
        (timeout,) = [t.removeprefix("--timeout=") for t in tokens if t.startswith("--timeout=")]
        seconds = int(timeout[:-1]) * units[timeout[-1]]
        assert job in deadlines, f"{command}: no RayJob {job}"
        assert seconds >= deadlines[job], f"{command}: waits {seconds}s, the job may run {deadlines[job]}s"
        waits += 1
    assert waits >= 1


def test_stage3_fine_tunes_what_the_merge_writes(fake_codec_sets):
    """The stage-3 RayJob runs the stage-3 config, starts from the merge's output and keeps the
    config's recipe: only where things are (S3) and the cluster's scale change."""
    jobs = {job["metadata"]["name"]: shlex.split(job["spec"]["entrypoint"]) for job in of_kind("RayJob")}
    (name,) = [n for n, tokens in jobs.items() if STAGE3_CONFIG in tokens]
    job, config = job_config(jobs[name], uploaded=False, where=name)
    assert job == "train"
    (merge,) = [job_config(tokens, uploaded=False, where=n)[1] for n, tokens in jobs.items() if tokens[2] == "jobs.merge"]
    assert config.model.init == merge.output
    assert config.model.init.startswith("s3://") and exported(config).startswith("s3://")
    local = load_config(TrainConfig, str(ROOT / STAGE3_CONFIG))
    # locally, too, stage 3 starts from what the merge config writes
    assert local.model.init == load_config(MergeJobConfig, str(ROOT / "configs" / "merge_shapesworld.yaml")).output
    same = {"name", "steps", "batch_size", "optim", "ema", "validation", "model"}
    for field in same:
        mine, theirs = getattr(config, field), getattr(local, field)
        if field == "model":
            mine, theirs = mine.model_copy(update={"init": None}), theirs.model_copy(update={"init": None})
        assert mine == theirs, f"{name}: {field} differs from {STAGE3_CONFIG}"


def test_rayjob_entrypoints_validate_with_their_jobs_configs(fake_codec_sets):
    configs = rayjob_configs()
    assert configs
    assert fake_codec_sets and all(d in built_dirs() for d in fake_codec_sets)


def test_train_jobs_keep_their_configs_datasets(fake_codec_sets):
    """The datasets override moves each dataset to S3 and changes nothing else of the recipe."""
    for job in of_kind("RayJob"):
        tokens = shlex.split(job["spec"]["entrypoint"])
        name, config = job_config(tokens, uploaded=False, where=job["metadata"]["name"])
        if name != "train":
            continue
        own = load_config(TrainConfig, str(ROOT / tokens[4]))
        strip = [{k: v for k, v in d.model_dump().items() if k != "path"} for d in own.datasets]
        assert [{k: v for k, v in d.model_dump().items() if k != "path"} for d in config.datasets] == strip


def exported(train: TrainConfig) -> str:
    """Where a training run writes its final model directory."""
    return train.export.path or st.join(train.run_dir, "model")


def test_the_jobs_chain_through_one_bucket_into_the_served_model(fake_codec_sets):
    by_job: dict[str, list] = {}
    for name, config in rayjob_configs().values():
        by_job.setdefault(name, []).append(config)
    (curate,), (synthesize,), (encode,), (merge,) = (by_job[j] for j in ("curate", "synthesize", "encode", "merge"))
    trains = by_job["train"]
    assert synthesize.input == curate.output
    assert encode.input == synthesize.output
    for train in trains:
        assert {d.path for d in train.datasets} == {encode.output}
    assert len({train.run_dir for train in trains}) == len(trains), "each stage has its own run directory"
    first = [train for train in trains if train.model.init is None]
    (stage3,) = [train for train in trains if train.model.init is not None]
    assert {merge.recipe.image_model, merge.recipe.audio_model} == {exported(train) for train in first}
    assert stage3.model.init == merge.output
    (app,) = serve_config()["applications"]
    assert app["args"]["model"] == exported(stage3)
    (evaluate,) = by_job["evaluate"]
    assert evaluate.model == exported(stage3)

    paths = [p for configs in by_job.values() for c in configs for p in s3_paths(c)] + [app["args"]["model"]]
    assert len({p.split("/")[2] for p in paths}) == 1, "every s3:// path is in one bucket"


# ---- serving ------------------------------------------------------------------------------------


def test_rayservice_serves_the_application():
    text = the_one("RayService")["spec"]["serveConfigV2"]
    assert isinstance(text, str), "serveConfigV2 is a YAML string"
    (app,) = serve_config()["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH
    module, _, attribute = SERVE_IMPORT_PATH.partition(":")
    assert f"{module.split('.')[0]}*" in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]

    args = app["args"]
    assert SERVE_ARGS <= set(args)
    assert args["model"].startswith("s3://")
    assert args["device"] in ("auto", "cpu", "cuda") and args["dtype"] in ("float32", "bfloat16", "float16")
    assert args["max_batch_size"] >= 1 and args["batch_wait_timeout_s"] > 0

    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == SERVE_DEPLOYMENTS
    (_, spec), *_ = cluster_specs()
    worker_groups = [(params, t["spec"]["containers"][0]["resources"]["limits"]) for n, params, t in groups(spec)
                     if n != "head"]
    gpu_capacity = sum(w["maxReplicas"] * int(w["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU, 0))
                       for w in spec["workerGroupSpecs"])

    generator = deployments["Generator"]
    gpus = generator["ray_actor_options"]["num_gpus"]
    assert gpus >= 1
    scaling = generator["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    assert scaling["max_replicas"] * gpus <= gpu_capacity, "more Generator replicas than GPU workers"
    assert generator["max_ongoing_requests"] >= args["max_batch_size"], "a replica could never fill a batch"
    assert any(int(lim.get(GPU, 0)) >= gpus and float(p["num-cpus"]) >= generator["ray_actor_options"]["num_cpus"]
               for p, lim in worker_groups), "no worker group fits one Generator replica"

    frontend = deployments["Frontend"]
    assert frontend["ray_actor_options"].get("num_gpus", 0) == 0
    assert any(GPU not in lim and float(p["num-cpus"]) >= frontend["ray_actor_options"]["num_cpus"]
               for p, lim in worker_groups), "no CPU worker group fits one Frontend replica"

    # once serve/ exists, the manifest must name what it provides
    if (ROOT / "serve" / "app.py").exists():
        assert callable(getattr(importlib.import_module(module), attribute))
    if (ROOT / "serve" / "schema.py").exists():
        importlib.import_module("serve.schema").ServeConfig.model_validate(args)
    if (ROOT / "serve" / "config.yaml").exists():
        (local,) = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"]
        assert local["import_path"] == SERVE_IMPORT_PATH
        assert {d["name"] for d in local.get("deployments", [])} <= SERVE_DEPLOYMENTS


# ---- image and runtime envs ---------------------------------------------------------------------


def test_dockerfile_builds_on_the_pinned_ray_with_the_constraints():
    (base,) = docker("FROM")
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-cu\d+", base)
    assert match, base
    assert match.group(1) == ray_pin(), "the base image's Ray must be constraints.txt's, or pip replaces it"
    minimum = re.fullmatch(r">=3\.(\d+)", pyproject()["project"]["requires-python"]).group(1)
    assert int(match.group(2)) >= int(minimum)

    installs = [run for run in docker("RUN") if "pip install" in run]
    assert installs and all("-c constraints.txt" in run for run in installs)
    assert any(re.search(r"pip install .*-e \.($| )", run) for run in installs), "the project itself is installed"
    steps = dockerfile()
    first_install = next(i for i, (ins, args) in enumerate(steps) if ins == "RUN" and "pip install" in args)
    assert any(ins == "COPY" and "constraints.txt" in args for ins, args in steps[:first_install])
    assert "HF_HUB_OFFLINE=1" in " ".join(docker("ENV"))
    assert {"runs/toy/clip", "runs/toy/codecs"} <= set(built_dirs())

    ignored = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)


def test_runtime_envs_are_valid():
    from ray.runtime_env import RuntimeEnv

    envs = runtime_envs()
    assert envs
    for name, env in envs.items():
        RuntimeEnv(**env)  # raises on unknown fields or bad values
        assert env.get("working_dir", ".") == "."  # run from the repository root
        assert {".git/", ".venv/", "runs/"} <= set(env.get("excludes", [])), name
        assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), name


# ---- the guide ----------------------------------------------------------------------------------


def readme_commands() -> list[str]:
    """The shell commands of infra/README.md's bash blocks, continuation lines joined and
    variables assigned in the block substituted."""
    text = (INFRA / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if len(tokens) == 1 and re.fullmatch(r"[A-Z_]+=\S+", tokens[0]):
                key, value = tokens[0].split("=", 1)
                variables[key] = value
            elif tokens:
                commands.append(re.sub(r"\$\{?([A-Z_]+)\}?", lambda m, v=variables: v[m.group(1)], line))
    return commands


def test_readme_commands_name_what_exists(fake_codec_sets):
    names = {kind: {d["metadata"]["name"] for d in of_kind(kind)} for kind in ("RayCluster", "RayJob", "RayService")}
    secret = the_one("Secret")
    submitted = 0
    for command in readme_commands():
        tokens = shlex.split(command, comments=True)
        for i, token in enumerate(tokens):
            if token.startswith("infra/"):
                assert any(ROOT.glob(token)) if "*" in token else (ROOT / token).exists(), command
            if m := re.fullmatch(r"svc/(.+)-(head|serve)-svc", token):
                assert m.group(1) in names["RayCluster" if m.group(2) == "head" else "RayService"], command
            if m := re.fullmatch(r"(?:rayjob|job)/(.+)", token):
                assert m.group(1) in names["RayJob"], command
            if token.startswith("ray.io/cluster="):
                assert token.split("=", 1)[1] in names["RayCluster"], command
        if tokens[:4] == ["kubectl", "create", "secret", "generic"]:
            assert tokens[4] == secret["metadata"]["name"]
            assert {t.split("=")[1] for t in tokens if t.startswith("--from-literal=")} == set(secret["stringData"])
        if tokens[:3] == ["ray", "job", "submit"]:
            split = tokens.index("--")
            options, entrypoint = tokens[:split], tokens[split + 1:]
            env = runtime_envs()[Path(options[options.index("--runtime-env") + 1]).name]
            uploaded = "--working-dir" in options or "working_dir" in env
            job_config(entrypoint, uploaded=uploaded, where=f"README: {command}")
            submitted += 1
    assert submitted >= 1
    readme = (INFRA / "README.md").read_text()
    for path in KUBERAY.glob("rayjob-*.yaml"):
        assert path.name in readme, f"infra/README.md does not say when to apply {path.name}"


def test_readme_bumps_the_image_tag_everywhere(tmp_path):
    """The README's bump command, run on a copy of the manifests and the guide, moves every image
    and the build and push lines to the new tag, and leaves nothing on the old one."""
    (command,) = [c for c in readme_commands() if c.startswith("sed ") and "omniflow-ray" in c and "kuberay" in c]
    (expression,) = [t for t in shlex.split(command) if "omniflow-ray" in t]
    new_tag = re.search(r":([^:#]+)#$", expression).group(1)
    assert new_tag != pyproject()["project"]["version"], command
    copy = tmp_path / "infra"
    (copy / "kuberay").mkdir(parents=True)
    for path in KUBERAY.glob("*.yaml"):
        (copy / "kuberay" / path.name).write_text(path.read_text())
    (copy / "README.md").write_text((INFRA / "README.md").read_text())
    subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, timeout=60)
    bumped = image().rpartition(":")[0] + ":" + new_tag
    for path in (copy / "kuberay").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert {i for _, i in images(doc, path.name)} <= {bumped}, path.name
    readme = (copy / "README.md").read_text()
    assert f"-t {bumped} ." in readme and f"docker push {bumped}" in readme
    assert image() not in readme and all(image() not in p.read_text() for p in (copy / "kuberay").glob("*.yaml"))

"""The shipped cluster files start as written: token auth on every node, a head that does no work, S3 by
instance profile / secret, the project from a pinned source."""

import re

import almdn_ray
from tests.distributed.cluster_files import KUBERAY, LAUNCHER, kuberay, kuberay_shape, launcher, launcher_shape

PINNED = re.compile(r"almdn-ray @ git\+https://\S+@v" + re.escape(almdn_ray.__version__) + r"\b")


def test_the_launcher_provisions_the_token_on_every_node_and_keeps_the_head_free():
    doc = launcher()
    token = "/home/ubuntu/.ray/auth_token"
    assert doc["file_mounts"][token] == "~/.ray/auth_token"
    starts = [c for c in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in command
    assert "--num-cpus=0" in doc["head_start_ray_commands"][-1]
    assert launcher_shape()["head"] == (0, 0)
    for node in doc["available_node_types"].values():
        config = node["node_config"]
        assert config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
        assert config["SecurityGroupIds"]
    installs = [c for c in doc["setup_commands"] if "pip install" in c and "almdn-ray @" in c]
    assert len(installs) == 1 and PINNED.search(installs[0]), installs


def test_kuberay_gives_every_ray_container_the_token_secret_and_a_pinned_image():
    docs = kuberay()
    job = docs["RayJob"]["spec"]
    cluster = job["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"], job["submitterPodTemplate"]]
    pods += [group["template"] for group in cluster["workerGroupSpecs"]]
    images = set()
    for pod in pods:
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
            secret = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert secret == {"name": "almdn-ray-auth", "key": "auth_token"}, container["name"]
            assert "value" not in env["RAY_AUTH_TOKEN"]
            images.add(container["image"])
    assert images == {f"registry.example.com/almdn-ray:{almdn_ray.__version__}"}
    assert PINNED.search(KUBERAY.read_text())  # the Dockerfile recipe pins the same release
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert kuberay_shape() == {"head": (0.0, 0.0), "workers": [(8.0, 1.0)] * 4}
    assert docs["ServiceAccount"]["metadata"]["name"] == "almdn-ray"
    # The run in the ConfigMap fits the cluster: one GPU worker per training worker.
    assert "num_workers: 4" in docs["ConfigMap"]["data"]["job.yaml"]
    for text in (KUBERAY.read_text(), LAUNCHER.read_text()):  # no secret value written into a file
        assert not re.search(r"AWS_SECRET_ACCESS_KEY=(?!\.\.\.)\S", text)

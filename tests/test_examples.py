"""The Slurm script and the Kubernetes manifest in examples/ run the documented command."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

from mnist_cnn.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def train_arguments(words: list[str]) -> list[str]:
    """The arguments after `-m mnist_cnn` of a torchrun command line."""
    start = words.index("mnist_cnn") + 1
    return words[start:]


def documented_train_arguments() -> set[str]:
    """The options of the `train` commands that the README runs under torchrun."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"torchrun [^`]*?-m mnist_cnn (train[^\n]*)", readme.replace("\\\n", " "))
    assert commands, "the README documents no torchrun command"
    return {word for command in commands for word in shlex.split(command) if word.startswith("--")}


def check(arguments: list[str]) -> None:
    args = build_parser().parse_args(arguments)  # exits on anything the CLI does not accept
    assert args.command == "train" and args.resume_if_exists and args.out is not None
    used = {word for word in arguments if word.startswith("--")}
    assert {"--resume-if-exists", "--out", "--dataset"} <= used & documented_train_arguments()


def test_the_slurm_script_is_valid_bash_and_requeues_the_documented_command():
    script = EXAMPLES / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --requeue" in text
    command = re.search(r"^srun torchrun (.*?)(?<!\\)$", text.replace("\\\n", " "), re.M)
    words = shlex.split(command.group(1).replace('"$RUN_DIR"', "/runs/x"))
    assert "--max-restarts=3" in words and "--rdzv-backend=c10d" in words
    check(train_arguments(words))


def test_the_pytorchjob_manifest_parses_and_every_pod_runs_the_documented_command():
    manifest = yaml.safe_load((EXAMPLES / "pytorchjob.yaml").read_text())
    assert manifest["kind"] == "PyTorchJob"
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    commands = [spec["template"]["spec"]["containers"][0]["command"] for spec in specs.values()]
    assert commands[0] == commands[1] and commands[0][0] == "torchrun"
    check(train_arguments(commands[0]))
    for spec in specs.values():
        pod = spec["template"]["spec"]
        claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
        assert claim and pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/runs"

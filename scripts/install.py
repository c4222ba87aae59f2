#!/usr/bin/env python3
"""The project's installs, with or without a package index (`make venv`, `make wheelhouse`).

  python scripts/install.py venv [--venv .venv] [--wheelhouse DIR] [--system-torch]
      Create (or update) the venv and install the project editable with its `test` extra, every
      package at the version pinned in constraints.txt. --wheelhouse DIR: from that folder only
      (`pip --no-index --find-links DIR`). --system-torch: on top of the torch and torchvision
      that this Python already has (`venv --system-site-packages`); torch, torchvision, triton and
      the nvidia-*/cuda-* wheels are left as they are, and the torch found must satisfy the
      project's requirement (pyproject.toml).

  python scripts/install.py wheelhouse [--dest wheelhouse] [--python-version 3.11]
                                       [--platform manylinux_2_28_x86_64] [--system-torch]
      Download every wheel that the venv command needs, for that Python and platform, into DEST,
      with the project's own wheel: on a machine with an index, for a host without one.

  python scripts/install.py system-constraints [--constraints constraints.txt]
      Print constraints.txt without the torch, torchvision, triton and CUDA pins.

The script runs on the Python that the venv is made from, with the standard library only; the
snippets that look at torch run on the venv's Python, with the `packaging` that pip vendors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_EXTRAS = "test"
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
# The interpreter constraints.txt was locked on (its header says so).
DEFAULT_PYTHON_VERSION = "3.11"
# Packages that a CUDA image's torch brings along, left out of pins and wheelhouse by
# --system-torch: torch itself, torchvision, triton and the CUDA runtime wheels.
SYSTEM_TORCH_NAMES = frozenset({"torch", "torchvision", "triton"})
SYSTEM_TORCH_PREFIXES = ("nvidia-", "cuda-")
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(?P<version>[^\s;#]+)\s*$")
EXTRA_MARKER = re.compile(r"""^extra\s*==\s*["'](?P<extra>[^"']+)["']$""")
NO_MATCH = re.compile(r"No matching distribution found for (?P<requirement>\S+)")
WRONG_PYTHON = re.compile(r"Package '(?P<requirement>[^']+)' requires a different Python")
# Every glibc that manylinux tags name, newest first, down to manylinux1 (glibc 2.5).
MANYLINUX = re.compile(r"^manylinux_(?P<major>\d+)_(?P<minor>\d+)_(?P<arch>\w+)$")
LEGACY_MANYLINUX = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}


class InstallError(Exception):
    """A problem with the inputs or the environment, said in one message for the user."""


# ----------------------------------------------------------------------------- constraints


def normalize(name: str) -> str:
    """PEP 503 name: `Pillow`, `typing_extensions` -> `pillow`, `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_system_torch_package(name: str) -> bool:
    """torch, torchvision, triton and the nvidia-*/cuda-* CUDA wheels."""
    name = normalize(name)
    return name in SYSTEM_TORCH_NAMES or name.startswith(SYSTEM_TORCH_PREFIXES)


def read_pins(path: Path) -> dict[str, str]:
    """The `name==version` lines of a constraints file, by normalized name."""
    if not path.is_file():
        raise InstallError(f"constraints file {path} does not exist")
    return parse_pins(path.read_text(), str(path))


def parse_pins(text: str, source: str = "constraints") -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        match = PIN.match(requirement)
        if not match:
            raise InstallError(f"{source}:{number}: {line!r} is not an exact `name==version` pin")
        pins[normalize(match["name"])] = match["version"]
    return pins


def filter_system_torch(text: str) -> tuple[str, list[str]]:
    """A constraints file's text without the system-torch pins, and the names of those removed."""
    kept, removed = [], []
    for line in text.splitlines():
        match = PIN.match(line.split("#", 1)[0].strip())
        if match and is_system_torch_package(match["name"]):
            removed.append(normalize(match["name"]))
        else:
            kept.append(line)
    return "\n".join(kept) + "\n", removed


def without_system_torch(pins: dict[str, str]) -> dict[str, str]:
    return {name: version for name, version in pins.items() if not is_system_torch_package(name)}


def write_pins(path: Path, pins: dict[str, str], header: str) -> Path:
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- helpers


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+ " + " ".join(str(part) for part in command), flush=True)
    return subprocess.run([str(part) for part in command], **kwargs)


def run_or_fail(command: list[str], what: str) -> None:
    result = run(command)
    if result.returncode != 0:
        raise InstallError(f"{what} failed (exit {result.returncode}); pip's output is above")


def wheelhouse_options(wheelhouse: Path | None) -> list[str]:
    if wheelhouse is None:
        return []
    if not wheelhouse.is_dir():
        raise InstallError(
            f"wheelhouse {wheelhouse} is not a folder (make it with `make wheelhouse`)"
        )
    if not any(wheelhouse.glob("*.whl")):
        raise InstallError(f"wheelhouse {wheelhouse} holds no .whl file")
    return ["--no-index", "--find-links", str(wheelhouse.resolve())]


def load_pyproject(project: Path) -> dict:
    path = project / "pyproject.toml"
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    if not path.is_file():
        raise InstallError(f"{path} does not exist: --project must be the project's folder")
    with open(path, "rb") as file:
        return tomllib.load(file)


def torch_requirement(project: Path) -> str:
    """The project's own torch requirement, e.g. `torch>=2.4,<2.15`."""
    for requirement in load_pyproject(project)["project"].get("dependencies", []):
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        if name and normalize(name.group()) == "torch":
            return requirement.split(";", 1)[0].strip()
    raise InstallError(f"{project / 'pyproject.toml'} lists no torch dependency")


# ----------------------------------------------------------------------------- venv

# Run on the venv's Python: torch and torchvision as that Python sees them, whether the version of
# torch satisfies the project's requirement, and the pins that disagree with what they require.
PROBE = r"""
import importlib, importlib.metadata, json, sys
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
from pip._vendor.packaging.version import Version
torch_requirement, pins = json.loads(sys.argv[1])
found = {}
for name in ("torch", "torchvision"):
    try:
        module = importlib.import_module(name)
        version = importlib.metadata.version(name)
    except Exception as error:
        found[name] = {"error": f"{type(error).__name__}: {error}"}
    else:
        found[name] = {"version": version, "file": module.__file__}
satisfied = None
if "version" in found["torch"]:
    satisfied = Requirement(torch_requirement).specifier.contains(
        Version(found["torch"]["version"]), prereleases=True)
conflicts = []
for name in ("torch", "torchvision"):
    if "version" not in found[name]:
        continue
    for text in importlib.metadata.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned and not requirement.specifier.contains(Version(pinned), prereleases=True):
            conflicts.append([canonicalize_name(requirement.name), pinned, text, name])
print(json.dumps({"found": found, "satisfied": satisfied, "conflicts": conflicts}))
"""


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def create_venv(venv: Path, system_torch: bool) -> None:
    config = venv / "pyvenv.cfg"
    if venv_python(venv).exists():
        if system_torch:
            settings = config.read_text() if config.is_file() else ""
            if not re.search(r"include-system-site-packages\s*=\s*true", settings):
                raise InstallError(
                    f"{venv} already exists without the system site packages that "
                    f"--system-torch needs: remove it (`make clean`) or pick another VENV"
                )
        return
    command = [sys.executable, "-m", "venv", str(venv)]
    if system_torch:
        command.insert(3, "--system-site-packages")
    run_or_fail(command, f"creating the venv {venv}")
    if system_torch and sys.prefix != sys.base_prefix:
        link_parent_venv(venv)


def link_parent_venv(venv: Path) -> None:
    """When PYTHON is itself a venv (an image's /opt/venv, say), `--system-site-packages` shows
    the base interpreter's packages, not PYTHON's own: a .pth file adds PYTHON's site-packages
    after the new venv's, so its torch is seen there too."""
    own = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    target = subprocess.run(
        [str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(target) / "_system_torch_parent.pth").write_text("\n".join(sorted(own)) + "\n")


def probe_torch(python: Path, requirement: str, pins: dict[str, str]) -> dict:
    result = subprocess.run(
        [str(python), "-c", PROBE, json.dumps([requirement, pins])],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise InstallError(f"looking for torch with {python} failed:\n{result.stderr.strip()}")
    return json.loads(result.stdout.splitlines()[-1])


def check_system_torch(python: Path, requirement: str, pins: dict[str, str]) -> dict:
    """The system torch and torchvision, or an InstallError that says what is missing or wrong."""
    probe = probe_torch(python, requirement, pins)
    found = probe["found"]
    where = f"{sys.executable} (SYSTEM_TORCH=1 uses the torch of the Python that makes the venv)"
    for name in ("torch", "torchvision"):
        if "error" in found[name]:
            raise InstallError(
                f"SYSTEM_TORCH: no {name} is importable from {where}: {found[name]['error']}. "
                f"Install {name} there first, or install without SYSTEM_TORCH=1"
            )
    if not probe["satisfied"]:
        raise InstallError(
            f"SYSTEM_TORCH: the torch found is {found['torch']['version']} "
            f"({found['torch']['file']}), but the project needs {requirement} (pyproject.toml)"
        )
    print(
        f"SYSTEM_TORCH: torch {found['torch']['version']} and torchvision "
        f"{found['torchvision']['version']} from {Path(found['torch']['file']).parents[1]}"
    )
    return probe


def install_venv(
    venv: Path,
    project: Path,
    constraints: Path,
    extras: str,
    wheelhouse: Path | None,
    system_torch: bool,
) -> None:
    index = wheelhouse_options(wheelhouse)
    pins = read_pins(constraints)
    create_venv(venv, system_torch)
    python = venv_python(venv)
    pip = [python, "-m", "pip", "install", "--quiet", *index]
    with tempfile.TemporaryDirectory(prefix="unet_ray_install.") as work:
        run_or_fail([*pip, "--upgrade", "pip", "-c", constraints], "upgrading pip")
        if system_torch:
            kept = without_system_torch(pins)
            requirement = torch_requirement(project)
            probe = check_system_torch(python, requirement, kept)
            for name, pinned, required, by in probe["conflicts"]:
                print(
                    f"SYSTEM_TORCH: {constraints.name} pins {name}=={pinned}, but the system "
                    f"{by} requires {required}: left to the system {by}"
                )
                kept.pop(name)
            found = probe["found"]
            kept["torch"] = found["torch"]["version"]
            kept["torchvision"] = found["torchvision"]["version"]
            constraints = write_pins(
                Path(work) / "constraints.txt",
                kept,
                f"{constraints} without torch, torchvision, triton and the CUDA wheels,\n"
                "with the system torch and torchvision pinned (SYSTEM_TORCH=1)",
            )
        target = f"{project}[{extras}]" if extras else str(project)
        run_or_fail([*pip, "-c", constraints, "-e", target], f"installing {target}")
        if system_torch:
            after = probe_torch(python, requirement, {})["found"]["torch"]
            before = probe["found"]["torch"]
            if after != before:
                raise InstallError(
                    f"SYSTEM_TORCH: pip replaced the system torch {before['version']} "
                    f"({before['file']}) with {after.get('version')} ({after.get('file')})"
                )


# ----------------------------------------------------------------------------- wheelhouse


def expand_platform(platform: str) -> list[str]:
    """A manylinux tag and every older glibc's, as pip accepts them for the running Python
    (`--platform` alone matches that one tag only); other platforms as given."""
    match = MANYLINUX.match(platform)
    arch = None
    if match:
        glibc, arch = (int(match["major"]), int(match["minor"])), match["arch"]
    else:
        prefix, _, rest = platform.partition("_")
        if prefix in LEGACY_MANYLINUX:
            glibc, arch = LEGACY_MANYLINUX[prefix], rest
    if arch is None:
        return [platform]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc[1], 4, -1)]
    for legacy, (_, minor) in LEGACY_MANYLINUX.items():
        # manylinux2010 and manylinux1 were defined for x86 only.
        if minor <= glibc[1] and (legacy == "manylinux2014" or arch in ("x86_64", "i686")):
            tags.append(f"{legacy}_{arch}")
    return tags


def project_requirements(wheel: Path, extras: list[str]) -> list[str]:
    """The Requires-Dist of the project's wheel for these extras, torch's included."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    requirements = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement, _, marker = line.split(":", 1)[1].partition(";")
        extra = EXTRA_MARKER.match(marker.strip())
        if extra and extra["extra"] not in extras:
            continue
        requirements.append(requirement.strip() if extra else line.split(":", 1)[1].strip())
    return requirements


def same_version(first: str, second: str) -> bool:
    from pip._vendor.packaging.version import Version

    return Version(first) == Version(second)


def find_missing_wheels(pip_target: list[str], pins: dict[str, str], work: Path) -> list[str]:
    """The pins that have no wheel for the target, each with the newest older version that has
    one: one pip call for all of them (`name<=pinned`), plus one per name with none at all."""
    names, missing = dict(pins), []
    listed, report = work / "check.txt", work / "check.json"
    while names:
        listed.write_text("".join(f"{name}<={pinned}\n" for name, pinned in names.items()))
        result = run(
            [*pip_target, "--no-deps", "--report", report, "-r", listed],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            break
        match = NO_MATCH.search(result.stderr) or WRONG_PYTHON.search(result.stderr)
        name = match and normalize(re.split(r"[=<>!~\[]", match["requirement"])[0])
        if not name or name not in names:
            raise InstallError(f"checking the pinned wheels failed:\n{result.stderr.strip()}")
        missing.append(f"{name}=={names.pop(name)} (no version up to it has a wheel)")
    else:
        return missing
    newest = {
        normalize(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    return [
        f"{name}=={pinned} (newest with a wheel: {newest[name]})"
        for name, pinned in names.items()
        if name in newest and not same_version(newest[name], pinned)
    ] + missing


def build_wheelhouse(
    dest: Path,
    project: Path,
    constraints: Path,
    extras: str,
    python_version: str,
    platform: str,
    system_torch: bool,
) -> None:
    if not re.fullmatch(r"3\.\d+", python_version):
        raise InstallError(f"--python-version {python_version!r} is not of the form 3.X (PY=3.12)")
    pins = read_pins(constraints)
    if system_torch:
        pins = without_system_torch(pins)
    dest.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in expand_platform(platform):
        target += ["--platform", tag]
    described = f"CPython {python_version} on {platform}"
    with tempfile.TemporaryDirectory(prefix="unet_ray_wheelhouse.") as temporary:
        work = Path(temporary)
        # 1. The project's own wheel (pure Python), for installs without its source.
        run_or_fail(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", work, project],
            f"building the wheel of {project}",
        )
        (own,) = work.glob("*.whl")
        shutil.copy2(own, dest / own.name)
        # 2. Resolve the project's requirements (torch's left out under --system-torch) for the
        # target Python and platform, within the pins, without downloading the wheels.
        requirements = [
            requirement
            for requirement in project_requirements(own, extras.split(",") if extras else [])
            if not (
                system_torch and is_system_torch_package(re.split(r"[\s=<>!~;\[]", requirement)[0])
            )
        ]
        listed = work / "requirements.txt"
        # With pip itself, which `venv` upgrades first, and the project's build requirements,
        # which an editable install from the wheelhouse needs.
        build = load_pyproject(project).get("build-system", {}).get("requires", [])
        listed.write_text("\n".join([*requirements, "pip", *build]) + "\n")
        pinned = write_pins(work / "constraints.txt", pins, f"{constraints}, for {described}")
        pip_target = [
            sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
            *target,
        ]  # fmt: skip
        report = work / "report.json"
        result = run(
            [*pip_target, "--report", report, "-c", pinned, "-r", listed],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            missing = find_missing_wheels(pip_target, pins, work)
            if missing:
                raise InstallError(
                    f"{constraints} pins {len(missing)} package(s) with no wheel for {described}: "
                    f"{', '.join(missing)}. It was locked on CPython {DEFAULT_PYTHON_VERSION}: "
                    f"build the wheelhouse for that Python (PY={DEFAULT_PYTHON_VERSION}), or lock "
                    f"for this one (`make lock PYTHON=python{python_version}`)"
                )
            raise InstallError(
                f"resolving the requirements of {own.name} for {described} failed:\n"
                f"{result.stderr.strip()}"
            )
        chosen = {
            normalize(item["metadata"]["name"]): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]
        }
        if system_torch:
            chosen = without_system_torch(chosen)
        # 3. Download exactly those.
        listed = write_pins(work / "download.txt", chosen, f"resolved for {described}")
        run_or_fail(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                *target,
                "-d",
                dest,
                "-r",
                listed,
            ],  # fmt: skip
            f"downloading the wheels for {described}",
        )
    wheels = sorted(dest.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    print(f"{dest}: {len(wheels)} wheels, {size:.0f} MiB, for {described}", end="")
    print(" (without torch, torchvision, triton and the CUDA wheels)" if system_torch else "")


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(command: argparse.ArgumentParser) -> None:
        command.add_argument("--project", type=Path, default=ROOT)
        command.add_argument("--constraints", type=Path, default=DEFAULT_CONSTRAINTS)
        command.add_argument("--extras", default=DEFAULT_EXTRAS, help="comma-separated")
        command.add_argument(
            "--system-torch",
            action="store_true",
            help="use this Python's torch and torchvision; leave torch, torchvision, triton "
            "and the nvidia-*/cuda-* wheels out",
        )

    venv = commands.add_parser("venv", help="create the venv and install the project")
    common(venv)
    venv.add_argument("--venv", type=Path, default=ROOT / ".venv")
    venv.add_argument("--wheelhouse", type=Path, help="install from this folder, no index")

    house = commands.add_parser("wheelhouse", help="download every wheel into a folder")
    common(house)
    house.add_argument("--dest", type=Path, default=ROOT / "wheelhouse")
    house.add_argument("--python-version", default=DEFAULT_PYTHON_VERSION, help="e.g. 3.12")
    house.add_argument("--platform", default=DEFAULT_PLATFORM, help="e.g. manylinux2014_x86_64")

    system = commands.add_parser("system-constraints", help="print the filtered constraints")
    system.add_argument("--constraints", type=Path, default=DEFAULT_CONSTRAINTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "system-constraints":
            read_pins(args.constraints)  # the same checks as the installs
            text, _ = filter_system_torch(args.constraints.read_text())
            sys.stdout.write(text)
        elif args.command == "venv":
            install_venv(
                args.venv,
                args.project.resolve(),
                args.constraints.resolve(),
                args.extras,
                args.wheelhouse,
                args.system_torch,
            )
        else:
            build_wheelhouse(
                args.dest,
                args.project.resolve(),
                args.constraints.resolve(),
                args.extras,
                args.python_version,
                args.platform,
                args.system_torch,
            )
    except InstallError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())

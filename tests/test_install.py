"""scripts/install.py (`make venv`, `make wheelhouse`): the SYSTEM_TORCH filter on the real
constraints.txt, and real offline installs (real venvs, real pip, --no-index) of small wheels
built here by a tiny in-tree build backend: nothing is downloaded, torch included."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY_ROOT / "scripts" / "install.py"
CONSTRAINTS_PATH = REPOSITORY_ROOT / "constraints.txt"

spec = importlib.util.spec_from_file_location("install_script", SCRIPT)
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

# A PEP 517 backend with no build requirements (so pip builds offline, isolated): wheels and
# editable wheels of the [project] table in pyproject.toml, the package's code under src/.
BACKEND = """
import base64, hashlib, tomllib, zipfile
from pathlib import Path


def _wheel(directory, editable):
    with open("pyproject.toml", "rb") as file:
        config = tomllib.load(file)
    meta, tag = config["project"], config["tool"]["test-backend"]["tag"]
    dist = f"{meta['name']}-{meta['version']}"
    if editable:
        files = {f"_{meta['name']}_editable.pth": str(Path.cwd() / "src") + "\\n"}
    else:
        files = {p.relative_to("src").as_posix(): p.read_text() for p in Path("src").rglob("*.py")}
    lines = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}"]
    lines += [f"Requires-Dist: {r}" for r in meta.get("dependencies", [])]
    for extra, requirements in meta.get("optional-dependencies", {}).items():
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {r}; extra == "{extra}"' for r in requirements]
    files[f"{dist}.dist-info/METADATA"] = "\\n".join(lines) + "\\n"
    files[f"{dist}.dist-info/WHEEL"] = (
        f"Wheel-Version: 1.0\\nGenerator: test-backend\\nRoot-Is-Purelib: true\\nTag: {tag}\\n"
    )
    record, rows, name = f"{dist}.dist-info/RECORD", [], f"{dist}-{tag}.whl"
    with zipfile.ZipFile(Path(directory) / name, "w") as archive:
        for path, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            archive.writestr(path, data)
            rows.append(f"{path},sha256={digest.decode()},{len(data)}")
        archive.writestr(record, "\\n".join([*rows, f"{record},,"]) + "\\n")
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, editable=False)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, editable=True)
"""


def offline_env() -> dict[str, str]:
    """This machine's pip settings (extra indexes, find-links, a torch cap) left out: pip sees
    only what a test hands it."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    env.pop("VIRTUAL_ENV", None)
    return env


def make_project(
    folder: Path,
    name: str,
    version: str,
    dependencies: tuple[str, ...] = (),
    code: str = "",
    tag: str = "py3-none-any",
    extras: dict[str, list[str]] | None = None,
) -> Path:
    folder.mkdir(parents=True)
    (folder / "backend.py").write_text(BACKEND)
    (folder / "src" / name).mkdir(parents=True)
    (folder / "src" / name / "__init__.py").write_text(code or f'__version__ = "{version}"\n')
    optional = "".join(f"{key} = {value!r}\n" for key, value in (extras or {}).items())
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(f"""\
            [build-system]
            requires = []
            build-backend = "backend"
            backend-path = ["."]

            [project]
            name = "{name}"
            version = "{version}"
            dependencies = {list(dependencies)!r}

            [project.optional-dependencies]
            """)
        + optional
        + f'\n[tool.test-backend]\ntag = "{tag}"\n'
    )
    return folder


def build_wheel(project: Path, wheelhouse: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-index", "--no-deps"]
        + ["-w", str(wheelhouse), str(project)],
        check=True,
        env=offline_env(),
    )


def bundled_pip_wheel() -> Path:
    """The pip wheel that ensurepip carries: the wheelhouse's pip, as `make wheelhouse` adds one."""
    import ensurepip

    wheels = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    assert wheels, f"no pip wheel bundled with {sys.executable}'s ensurepip"
    return wheels[-1]


def run_script(python: Path | str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=240,
    )


def venv_import(venv: Path, code: str) -> str:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env=offline_env(),
    ).stdout.strip()


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """A wheelhouse (tinydep 1.0 and 2.0, sympyish 2.0, pip), the app project that needs them,
    and a fake torch 2.5.0 / torchvision 0.20.0 pair to install as a "system" torch."""
    root = tmp_path_factory.mktemp("offline")
    wheelhouse, system_wheels = root / "wheelhouse", root / "system-wheels"
    wheelhouse.mkdir()
    pip_wheel = bundled_pip_wheel()
    shutil.copy2(pip_wheel, wheelhouse / pip_wheel.name)
    for version in ("1.0", "2.0"):
        build_wheel(make_project(root / f"tinydep-{version}", "tinydep", version), wheelhouse)
    build_wheel(make_project(root / "sympyish-2.0", "sympyish", "2.0"), wheelhouse)
    # The "system" side: torch requires sympyish==1.0 (as torch 2.5 pins sympy==1.13.1).
    build_wheel(make_project(root / "sympyish-1.0", "sympyish", "1.0"), system_wheels)
    for version in ("2.5.0", "2.15.0"):
        torch = make_project(root / f"torch-{version}", "torch", version, ("sympyish==1.0",))
        build_wheel(torch, system_wheels)
    build_wheel(make_project(root / "torchvision", "torchvision", "0.20.0"), system_wheels)
    app = make_project(
        root / "app",
        "app",
        "0.1.0",
        ("tinydep", "torch>=2.4,<2.15", "torchvision", "sympyish"),
        code="import tinydep\n\nDEP = tinydep.__version__\n",
        extras={"test": ["tinydep>=2"]},
    )
    pip_version = re.match(r"pip-([^-]+)-", pip_wheel.name).group(1)
    constraints = root / "constraints.txt"
    constraints.write_text(
        "# the app's pins, with CUDA-style ones that SYSTEM_TORCH leaves out\n"
        f"pip=={pip_version}\nsympyish==2.0\ntinydep==2.0\ntorch==2.14.0\ntorchvision==0.29.1\n"
        "triton==3.8.0\nnvidia-cublas==13.1.1.3\ncuda-bindings==13.5.0\n"
    )
    return {
        "root": root,
        "wheelhouse": wheelhouse,
        "system_wheels": system_wheels,
        "app": app,
        "constraints": constraints,
    }


def make_base_env(path: Path, offline: dict, *packages: str) -> Path:
    """A venv standing for an image's Python, with these packages from the system wheels."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, env=offline_env())
    if packages:
        subprocess.run(
            [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index"]
            + ["--find-links", str(offline["system_wheels"]), *packages],
            check=True,
            env=offline_env(),
        )
    return path / "bin" / "python"


def app_venv_args(offline: dict, venv: Path, *extra: str) -> list[str]:
    return [
        "venv",
        "--venv",
        str(venv),
        "--project",
        str(offline["app"]),
        "--constraints",
        str(offline["constraints"]),
        "--wheelhouse",
        str(offline["wheelhouse"]),
        *extra,
    ]


# ----------------------------------------------------------------------------- constraints


def test_system_torch_filter_on_the_real_constraints():
    text = CONSTRAINTS_PATH.read_text()
    pins = install.read_pins(CONSTRAINTS_PATH)
    filtered, removed = install.filter_system_torch(text)
    kept = install.parse_pins(filtered)
    cuda = {name for name in pins if name.startswith(("nvidia-", "cuda-"))}
    assert {"torch", "torchvision", "triton"} <= set(removed)
    assert len(cuda) >= 10  # the CUDA 13 wheels: nvidia-cublas, cuda-bindings, ...
    assert set(removed) == {"torch", "torchvision", "triton"} | cuda
    # Everything else is kept, at the same version, and the header comment too.
    assert kept == {name: v for name, v in pins.items() if name not in set(removed)}
    assert kept["ray"] == pins["ray"] and kept["numpy"] == pins["numpy"]
    assert "torchmetrics" not in pins  # a look-alike name would be kept: is_system_torch_package
    assert not install.is_system_torch_package("torchmetrics")
    assert install.is_system_torch_package("Nvidia_CuBLAS")  # names are normalized
    assert filtered.startswith("# Exact versions")
    assert install.without_system_torch(pins) == kept


def test_system_constraints_command_prints_the_filtered_file():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "system-constraints"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "ray==" + install.read_pins(CONSTRAINTS_PATH)["ray"] in lines
    assert not [
        line for line in lines if re.match(r"(torch|torchvision|triton|nvidia-|cuda-)", line)
    ]


def test_a_constraints_line_that_is_not_a_pin_is_named(tmp_path):
    broken = tmp_path / "constraints.txt"
    broken.write_text("ray==2.60.0\nnumpy>=2\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "system-constraints", "--constraints", str(broken)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f"{broken}:2: 'numpy>=2' is not an exact `name==version` pin" in result.stderr


def test_manylinux_platforms_expand_to_older_glibcs():
    tags = install.expand_platform("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    assert install.expand_platform("manylinux2014_aarch64")[-1] == "manylinux2014_aarch64"
    assert "manylinux1_aarch64" not in install.expand_platform("manylinux2014_aarch64")
    assert install.expand_platform("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


# ----------------------------------------------------------------------------- installs


@pytest.mark.timeout(240)
def test_offline_install_from_a_wheelhouse(offline, tmp_path):
    venv, base = tmp_path / "venv", make_base_env(tmp_path / "base", offline)
    # The app needs torch==2.14.0 (pinned), which this wheelhouse lacks: the install fails.
    result = run_script(base, *app_venv_args(offline, venv))
    assert result.returncode == 2
    assert "ResolutionImpossible" in result.stderr  # pip (quiet) says no more
    assert f"error: installing {offline['app']}[test] failed (exit 1)" in result.stderr
    # A wheelhouse that holds torch too (the fake 2.5.0 and its sympyish 1.0), pinned to it.
    house = tmp_path / "house"
    shutil.copytree(offline["wheelhouse"], house)
    for wheel in offline["system_wheels"].glob("*.whl"):
        if not wheel.name.startswith("torch-2.15"):
            shutil.copy2(wheel, house / wheel.name)
    constraints = tmp_path / "constraints.txt"
    text = offline["constraints"].read_text()
    for name, version in (("torch", "2.5.0"), ("torchvision", "0.20.0"), ("sympyish", "1.0")):
        text = re.sub(rf"^{name}==\S+$", f"{name}=={version}", text, flags=re.MULTILINE)
    constraints.write_text(text)
    args = app_venv_args(offline, venv)
    args[args.index("--constraints") + 1] = str(constraints)
    args[args.index("--wheelhouse") + 1] = str(house)
    started = time.monotonic()
    result = run_script(base, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"offline install of the app into an existing venv: {time.monotonic() - started:.1f} s")
    assert f"--no-index --find-links {house}" in result.stdout
    imported = "import app, tinydep, torch, sympyish; "
    imported += "print(app.DEP, tinydep.__version__, torch.__version__, sympyish.__version__)"
    # tinydep 2.0 (the pin, though 1.0 is in the wheelhouse too), torch 2.5.0, sympyish 1.0.
    assert venv_import(venv, imported) == "2.0 2.0 2.5.0 1.0"
    # Editable, as plain `make venv`: the venv imports the project's source folder.
    assert venv_import(venv, "import app; print(app.__file__)") == str(
        offline["app"] / "src" / "app" / "__init__.py"
    )


@pytest.mark.timeout(240)
def test_system_torch_without_torch_fails_clearly(offline, tmp_path):
    base = make_base_env(tmp_path / "base", offline)
    result = run_script(base, *app_venv_args(offline, tmp_path / "venv", "--system-torch"))
    assert result.returncode == 2
    assert "SYSTEM_TORCH: no torch is importable from" in result.stderr
    assert str(base) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(240)
def test_system_torch_outside_the_project_range_names_the_version(offline, tmp_path):
    base = make_base_env(tmp_path / "base", offline, "torch==2.15.0", "torchvision")
    result = run_script(base, *app_venv_args(offline, tmp_path / "venv", "--system-torch"))
    assert result.returncode == 2
    assert "SYSTEM_TORCH: the torch found is 2.15.0" in result.stderr
    assert "the project needs torch>=2.4,<2.15 (pyproject.toml)" in result.stderr


@pytest.mark.timeout(240)
def test_system_torch_installs_the_rest_and_leaves_torch_alone(offline, tmp_path):
    base = make_base_env(tmp_path / "base", offline, "torch==2.5.0", "torchvision")
    venv = tmp_path / "venv"
    result = run_script(base, *app_venv_args(offline, venv, "--system-torch"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SYSTEM_TORCH: torch 2.5.0 and torchvision 0.20.0" in result.stdout
    # constraints pin sympyish==2.0, the system torch requires ==1.0: torch's requirement wins.
    assert "pins sympyish==2.0, but the system torch requires sympyish==1.0" in result.stdout
    seen = venv_import(
        venv,
        "import torch, torchvision, sympyish, tinydep, app; "
        "print(torch.__version__, torch.__file__, sympyish.__version__, app.DEP)",
    ).split()
    base_prefix = str(tmp_path / "base")
    assert seen[0] == "2.5.0" and seen[1].startswith(base_prefix)  # the base's, not a copy
    assert seen[2] == "1.0" and seen[3] == "2.0"  # tinydep pinned by the constraints
    assert not list((venv / "lib").glob("python*/site-packages/torch"))


@pytest.mark.timeout(120)
def test_wheelhouse_names_a_pin_without_a_wheel_for_the_python(offline, tmp_path):
    """`make wheelhouse` against a local 'index' (find-links): a pin whose only wheel is for
    CPython 3.11 is named, with its version, for PY=3.12; nothing is downloaded."""
    index = tmp_path / "index"
    index.mkdir()
    for wheel in offline["wheelhouse"].glob("*.whl"):
        (index / wheel.name).write_bytes(wheel.read_bytes())
    build_wheel(make_project(tmp_path / "old-1.0", "oldonly", "1.0", tag="cp311-none-any"), index)
    app = make_project(tmp_path / "app2", "app2", "0.1.0", ("oldonly", "tinydep"))
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("oldonly==1.0\ntinydep==2.0\ntorch==2.14.0\n")
    env = {**offline_env(), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index)}
    args = ["wheelhouse", "--project", str(app), "--constraints", str(constraints), "--extras", ""]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--dest", str(tmp_path / "house312")]
        + ["--python-version", "3.12", "--system-torch", "--platform", "any"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pins 1 package(s) with no wheel for CPython 3.12 on any: oldonly==1.0" in result.stderr
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--dest", str(tmp_path / "house311")]
        + ["--python-version", "3.11", "--system-torch", "--platform", "any"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = sorted(wheel.name.split("-")[0] for wheel in (tmp_path / "house311").glob("*.whl"))
    assert names == ["app2", "oldonly", "pip", "tinydep"]
    assert (tmp_path / "house311" / "tinydep-2.0-py3-none-any.whl").is_file()

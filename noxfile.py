"""Sessions for the whole monorepo: lint, types, unit tests, build check, guest tests, benchmarks.

The README's test command runs `nox -s lint typecheck build tests e2e conformance backends`;
`.ci/run` runs exactly that command, after scripts/install-deps.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

import nox

ROOT = pathlib.Path(__file__).parent
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "build", "tests", "e2e", "conformance", "backends"]

# In layering order: a package appears after everything it depends on.
PACKAGES = [
    ("scsi-core", "scsi_core"),
    ("scsi-emulation", "scsi_emulation"),
    ("virtio-queue", "virtio_queue"),
    ("vhost-user", "vhost_user"),
    ("vhost-device-scsi", "vhost_device_scsi"),
    ("iscsi-target", "iscsi_target"),
]
TEST_DEPS = ["pytest>=8", "pytest-trio>=0.8", "hypothesis>=6", "trio>=0.22"]
PYTHON = "3.11"


def _install_packages(session: nox.Session) -> None:
    """Install every package editable, with its siblings resolved from this checkout."""
    args: list[str] = []
    for dist, _ in PACKAGES:
        args += ["-e", str(ROOT / "packages" / dist)]
    # --no-deps then the external deps: sibling names must never resolve to PyPI.
    session.install("--no-deps", *args)
    session.install(*TEST_DEPS)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over every package's sources and tests, and the top-level tests."""
    _install_packages(session)
    session.install("mypy>=1.10", "nox")
    targets = []
    for dist, _ in PACKAGES:
        targets.append(f"packages/{dist}/src")
    session.run("mypy", "--strict", *targets)
    # Tests, examples and benchmarks are checked per directory: several share module names.
    for dist, _ in PACKAGES:
        for sub in ("tests", "examples", "benchmarks"):
            path = ROOT / "packages" / dist / sub
            if any(path.glob("*.py")):
                session.run("mypy", "--strict", str(path.relative_to(ROOT)))
    for extra in ("tests", "benchmarks", "noxfile.py"):
        if (ROOT / extra).exists():
            session.run("mypy", "--strict", extra)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Every unit and integration test that needs no guest or external server."""
    _install_packages(session)
    session.run(
        "pytest",
        "-m",
        "not e2e and not iscsi and not backends",
        "-p",
        "no:cacheprovider",
        *session.posargs,
    )


@nox.session(python=PYTHON)
def build(session: nox.Session) -> None:
    """Build sdist + wheel of every package, then install each wheel alone and import it.

    Each wheel goes into a fresh venv with only its declared dependencies: a package that imports a
    sibling it does not declare (a layering violation such as virtio_queue importing scsi_core)
    fails here.
    """
    session.install("build>=1", "hatchling>=1.18")
    dist_dir = ROOT / "dist"
    shutil.rmtree(dist_dir, ignore_errors=True)
    for dist, _ in PACKAGES:
        session.run(
            "python", "-m", "build", "--no-isolation", "--outdir", str(dist_dir),
            str(ROOT / "packages" / dist),
        )  # fmt: skip
    check = (
        "import importlib, pkgutil, sys; m = importlib.import_module(sys.argv[1]); "
        "names = [i.name for i in pkgutil.walk_packages(m.__path__, m.__name__ + '.') "
        "if not i.name.endswith('.__main__')]; "
        "[importlib.import_module(n) for n in names]; "
        "print('imported', sys.argv[1], 'and its', len(names), 'modules')"
    )
    for dist, module in PACKAGES:
        wheel = next(dist_dir.glob(f"{dist.replace('-', '_')}-*.whl"))
        with tempfile.TemporaryDirectory() as tmp:
            venv = pathlib.Path(tmp) / "venv"
            session.run("python", "-m", "venv", str(venv))
            pip = str(venv / "bin" / "pip")
            # Siblings come only from dist/ (--no-index); trio, the one external runtime
            # dependency, from the package index first.
            if dist not in ("scsi-core", "scsi-emulation", "virtio-queue"):
                session.run(pip, "install", "-q", "trio>=0.22", external=True)
            session.run(
                pip, "install", "-q", "--no-index", "--find-links", str(dist_dir), str(wheel),
                external=True,
            )  # fmt: skip
            session.run(str(venv / "bin" / "python"), "-c", check, module, external=True)


@nox.session(python=PYTHON)
def e2e(session: nox.Session) -> None:
    """Boot real Linux guests under QEMU against the daemon (needs scripts/install-deps)."""
    _install_packages(session)
    session.run("pytest", "-m", "e2e", "-p", "no:cacheprovider", "tests/e2e", *session.posargs)


@nox.session(python=PYTHON)
def conformance(session: nox.Session) -> None:
    """Run libiscsi's iscsi-test-cu conformance suite against the iSCSI target."""
    _install_packages(session)
    if not (ROOT / "tests" / "iscsi").exists():
        session.skip("no iSCSI conformance harness yet")
    session.run("pytest", "-m", "iscsi", "-p", "no:cacheprovider", "tests/iscsi", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Print performance figures; never asserts them. Compares against references in one run."""
    _install_packages(session)
    env = {"PYTHONUNBUFFERED": "1"}
    session.run("python", "packages/virtio-queue/benchmarks/bench_queue.py", env=env)
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if script.name.startswith("_"):
            continue
        session.run("python", str(script.relative_to(ROOT)), *session.posargs, env=env)


@nox.session(python=PYTHON)
def daemon(session: nox.Session) -> None:
    """Run the daemon on ./vhost-scsi.sock serving ./disk.img (1 GiB, sparse, made if absent)."""
    _install_packages(session)
    image = ROOT / "disk.img"
    if not image.exists():
        with open(image, "wb") as f:
            f.truncate(1 << 30)
    args = session.posargs or ["--socket-path", str(ROOT / "vhost-scsi.sock"), str(image)]
    session.run("vhost-device-scsi", *args)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Start the daemon on a fresh sparse image; boot a guest that partitions, formats, uses it."""
    _install_packages(session)
    env = {"PYTHONPATH": os.fspath(ROOT)}
    session.run("python", "tests/e2e/demo.py", *session.posargs, env=env)


@nox.session(
    python="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else PYTHON,
    venv_params=["--system-site-packages"],
)
def backends(session: nox.Session) -> None:
    """Storage back-ends against real servers: nbdkit, qemu-nbd, loop devices, Ceph RBD.

    Runs under Debian's /usr/bin/python3 with its site packages, the only interpreter that
    imports python3-libnbd (the libnbd cross-checks; see ../shared/backends.md); needs the
    packages scripts/install-deps installs, and root for losetup. Tests skip with the reason
    when a tool is missing.
    """
    _install_packages(session)
    session.run(
        "pytest", "-m", "backends", "-p", "no:cacheprovider", "tests/backends", *session.posargs
    )

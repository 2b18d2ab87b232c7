"""tools/setup.sh refuses plainly, before downloading anything, when the disk is too full."""

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_with_free_space(tmp_path: Path, free_kb: int) -> subprocess.CompletedProcess:
    """Run a copy of setup.sh in an empty checkout whose `df` reports `free_kb` free everywhere."""
    checkout = tmp_path / "checkout"
    (checkout / "tools").mkdir(parents=True)
    shutil.copy(REPO / "tools" / "setup.sh", checkout / "tools" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    df = bin_dir / "df"
    df.write_text(
        "#!/bin/sh\n"
        'echo "Filesystem 1024-blocks Used Available Capacity Mounted on"\n'
        f'echo "/dev/fake 999999999 1 {free_kb} 1% /"\n'
    )
    df.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", str(checkout / "tools" / "setup.sh")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )


def test_setup_stops_with_a_clear_message_when_the_disk_is_too_full(tmp_path):
    result = _setup_with_free_space(tmp_path, free_kb=2 * 1024 * 1024)  # 2 GB
    assert result.returncode == 1
    assert "2 GB free in" in result.stderr
    assert str(tmp_path / "checkout") in result.stderr
    assert "needs about 7 GB" in result.stderr
    # it stopped before doing anything: no environment was started
    assert not (tmp_path / "checkout" / ".venv").exists()

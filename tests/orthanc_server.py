"""A throwaway Orthanc PACS with its DICOMweb plugin for the tests: Debian's ``orthanc`` and
``orthanc-dicomweb`` (installed by ``scripts/ensure_dicom_tools.sh``, not here), a JSON
configuration written for the test (free loopback ports, storage in a temporary folder, basic
authentication, the plugin found with ``dpkg -L``), started, waited for on ``/system`` and
stopped at the end."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC = "/usr/sbin/Orthanc"
USER, PASSWORD = "infmap", "test-only-password"
START_TIMEOUT_S = 60  # a busy 2-core machine


class OrthancUnavailable(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed."""


def dicomweb_plugin() -> Path:
    """The plugin's shared library, as the Debian package lists it."""
    if not Path(ORTHANC).exists() or shutil.which("dpkg") is None:
        raise OrthancUnavailable(f"{ORTHANC} is missing (apt-get install orthanc)")
    listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True)
    libraries = [Path(p) for p in listed.stdout.splitlines() if "libOrthancDicomWeb.so" in p]
    libraries = [p for p in libraries if p.is_file()]
    if listed.returncode != 0 or not libraries:
        raise OrthancUnavailable(
            "the DICOMweb plugin is missing (apt-get install orthanc-dicomweb)"
        )
    return libraries[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancServer:
    root: Path
    http_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return USER, PASSWORD

    def start(self) -> None:
        storage = self.root / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "InfMapTest",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        log = open(self.root / "orthanc.log", "wb")  # noqa: SIM115 - kept open for the process
        self.process = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=2).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S} s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def upload(self, data: bytes) -> str:
        """Store one DICOM file through Orthanc's REST API; its Orthanc instance id."""
        answer = requests.post(f"{self.url}/instances", data=data, auth=self.auth, timeout=60)
        answer.raise_for_status()
        return str(answer.json()["ID"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def start_orthanc(root: Path) -> OrthancServer:
    server = OrthancServer(root, free_port())
    server.start()
    return server

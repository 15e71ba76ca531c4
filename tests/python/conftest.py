"""Starts a real `fulcrum serve` on an ephemeral 127.0.0.1 port for the SDK tests."""
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET_DIR = os.path.join(ROOT, os.environ.get("CARGO_TARGET_DIR", "target"))  # join keeps an absolute one
BINARY = os.environ.get("FULCRUM_BIN", os.path.join(TARGET_DIR, "debug", "fulcrum"))
PASSWORD = "Adm1n-secret"

# requests lets these variables override verify=False, which the SDK relies on for the
# controller's self-signed certificate.
for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
    os.environ.pop(var, None)


class Controller:
    def __init__(self, plain_http=False):
        # Everything this controller and its tests write lives under one folder, removed by stop().
        self.scratch = tempfile.mkdtemp(prefix="fulcrum-sdk-")
        self.data_dir = os.path.join(self.scratch, "data")
        os.makedirs(self.data_dir)
        # A package signing key the controller trusts, for the image upload tests.
        self.key_dir = os.path.join(self.scratch, "keys")
        os.makedirs(self.key_dir)
        self.key = os.path.join(self.key_dir, "release")
        subprocess.run([BINARY, "pkg", "keygen", "--out", self.key], check=True, capture_output=True)
        os.makedirs(os.path.join(self.data_dir, "trusted-keys"))
        with open(self.key + ".pub") as src, open(os.path.join(self.data_dir, "trusted-keys", "release.pub"), "w") as dst:
            dst.write(src.read())
        args = [BINARY, "serve", "--listen", "127.0.0.1:0", "--data-dir", self.data_dir]
        if plain_http:
            args.append("--plain-http")
        env = dict(os.environ, FULCRUM_ADMIN_PASSWORD=PASSWORD, FULCRUM_LOG="warn")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.time() + 30
        self.url = None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"fulcrum listening on (\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.proc.kill()
            self.proc.wait(timeout=15)
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise RuntimeError("fulcrum did not start")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)


@pytest.fixture
def plain_controller():
    """A fresh plain-HTTP controller whose output is drained (fuzzing makes it log a lot)."""
    c = Controller(plain_http=True)
    threading.Thread(target=lambda: [None for _ in c.proc.stdout], daemon=True).start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def controller():
    c = Controller()
    yield c
    c.stop()

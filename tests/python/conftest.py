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


def start_fulcrum(data_dir, listen="127.0.0.1:0", plain_http=False, extra=()):
    """Starts `fulcrum serve`; returns (process, url) once it says where it listens."""
    args = [BINARY, "serve", "--listen", listen, "--data-dir", data_dir, *extra]
    if plain_http:
        args.append("--plain-http")
    env = dict(os.environ, FULCRUM_ADMIN_PASSWORD=PASSWORD, FULCRUM_LOG="warn")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"fulcrum listening on (\S+)", line)
        if m:
            # Keep draining its output so it never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    proc.wait(timeout=15)
    raise RuntimeError("fulcrum did not start")


def stop_process(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


class Controller:
    """One controller on its embedded store. `url` is where the tests talk to it; uploads go to
    `upload_url` (the same node here)."""

    def __init__(self, plain_http=False, extra=()):
        # Everything this controller and its tests write lives under one folder, removed by stop().
        self.scratch = tempfile.mkdtemp(prefix="fulcrum-sdk-")
        self.make_key()
        self.processes = []
        try:
            data_dir = self.data_dir("data")
            proc, self.url = start_fulcrum(data_dir, plain_http=plain_http, extra=extra)
            self.processes.append(proc)
        except Exception:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise
        self.upload_url = self.url
        self.follower = False

    def make_key(self):
        # A package signing key the controllers trust, for the image upload tests.
        self.key_dir = os.path.join(self.scratch, "keys")
        os.makedirs(self.key_dir)
        self.key = os.path.join(self.key_dir, "release")
        subprocess.run([BINARY, "pkg", "keygen", "--out", self.key], check=True, capture_output=True)

    def data_dir(self, name):
        """A data dir that trusts the signing key."""
        path = os.path.join(self.scratch, name)
        os.makedirs(os.path.join(path, "trusted-keys"))
        with open(self.key + ".pub") as src, open(os.path.join(path, "trusted-keys", "release.pub"), "w") as dst:
            dst.write(src.read())
        return path

    def stop(self):
        try:
            for proc in self.processes:
                stop_process(proc)
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, within=30):
    import socket
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on port %d" % port)


class ClusterFollower(Controller):
    """Three controllers on a real etcd, each at an address of its own; `url` is a follower's,
    `upload_url` the leader's (images are uploaded on the leader only, as the product says)."""

    def __init__(self):
        import requests
        self.scratch = tempfile.mkdtemp(prefix="fulcrum-sdk-cluster-")
        self.processes = []
        try:
            self.make_key()
            client, peer = free_port(), free_port()
            client_url, peer_url = "http://127.0.0.1:%d" % client, "http://127.0.0.1:%d" % peer
            etcd = subprocess.Popen(
                ["etcd", "--name", "e0", "--data-dir", os.path.join(self.scratch, "etcd"),
                 "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                 "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                 "--initial-cluster", "e0=" + peer_url, "--max-txn-ops", "4096"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.processes.append(etcd)
            wait_for_port(client)
            urls = {}
            for i, name in enumerate(["a", "b", "c"]):
                proc, url = start_fulcrum(
                    self.data_dir(name), listen="127.0.0.%d:0" % (i + 1),
                    extra=["--etcd", client_url, "--node-name", name, "--lease-ttl", "2"])
                # The controllers stop before etcd does.
                self.processes.insert(0, proc)
                urls[name] = url
            deadline = time.time() + 60
            leader = None
            while time.time() < deadline and leader is None:
                try:
                    runtime = requests.get(urls["a"] + "/api/cluster/runtime", auth=("admin", PASSWORD),
                                           verify=False, timeout=5).json()
                    leaders = [n["name"] for n in runtime.get("node_states", []) if n["role"] == "CLUSTER_LEADER"]
                    if len(runtime.get("node_states", [])) == 3 and leaders:
                        leader = leaders[0]
                except (requests.RequestException, ValueError):
                    pass
                time.sleep(0.2)
            if leader is None:
                raise RuntimeError("the cluster elected no leader")
            self.upload_url = urls[leader]
            self.url = next(url for name, url in sorted(urls.items()) if name != leader)
            self.follower = True
        except Exception:
            self.stop()
            raise


def build_package(controller, kind, version, patch=None, payload_bytes=0, controller_binary=True):
    """A real signed package made with `fulcrum pkg build`; returns its path, tag and sha256.
    `payload_bytes` of random data in the SE part make it as large as a test needs. Without
    `controller_binary` the controller part carries no bin/fulcrum, so an upgrade to it
    restarts the controller into the binary it runs (as the README's example payload does)."""
    import hashlib

    work = tempfile.mkdtemp(prefix="pkg-", dir=controller.scratch)
    se = os.path.join(work, "se", "bin")
    os.makedirs(se)
    with open(os.path.join(se, "fulcrum-se"), "w") as f:
        f.write("#!/bin/sh\necho se\n")
    if payload_bytes:
        with open(os.path.join(se, "payload"), "wb") as f:
            f.write(os.urandom(payload_bytes))
    out = os.path.join(work, kind + ".pkg")
    args = [BINARY, "pkg", "build", "--kind", kind, "--version", version, "--build", "9100",
            "--date", "20261122.101500", "--min-version", "30.1.1", "--se-dir", os.path.dirname(se),
            "--key", controller.key + ".secret", "-o", out]
    if patch:
        args += ["--patch", patch]
    if kind == "controller":
        controller_dir = os.path.join(work, "controller", "bin")
        os.makedirs(controller_dir)
        if controller_binary:
            with open(os.path.join(controller_dir, "fulcrum"), "w") as f:
                f.write("#!/bin/sh\necho controller\n")
        else:
            with open(os.path.join(controller_dir, "README"), "w") as f:
                f.write("a controller release without a binary of its own\n")
        args += ["--controller-dir", os.path.dirname(controller_dir)]
    subprocess.run(args, check=True, capture_output=True)
    tag = "-".join([version, "9100"] + ([patch] if patch else []) + ["20261122.101500"])
    with open(out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return out, tag, digest


@pytest.fixture
def plain_controller():
    """A fresh plain-HTTP controller whose output is drained (fuzzing makes it log a lot)."""
    c = Controller(plain_http=True)
    yield c
    c.stop()


@pytest.fixture(scope="session", params=["single", "cluster-follower"])
def controller(request):
    """Every SDK test runs against a single controller and against a follower of a cluster."""
    c = Controller() if request.param == "single" else ClusterFollower()
    yield c
    c.stop()

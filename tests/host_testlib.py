"""Shared fixtures of the snf-image-host.py tests: a private configuration
(IMAGE_DIR, variants, back-end dirs under tmp_path), a runner for the
`deploy` verb, and a real HTTP server on 127.0.0.1 with misbehaving routes."""

import http.server
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, require_programs, require_root

HOST = REPO / "snf-image-host.py"


class Site:
    """A private installation under tmp_path: configuration file and directories."""

    def __init__(self, root, **settings):
        self.root = Path(root)
        self.images = self.root / "images"
        self.variants = self.root / "variants"
        self.backends = self.root / "backends"
        self.backends_config = self.root / "backends-config"
        for directory in (self.images, self.variants, self.backends / "src", self.backends / "dst",
                          self.backends_config / "src", self.backends_config / "dst"):
            directory.mkdir(parents=True, exist_ok=True)
        (self.variants / "default.conf").write_text("")
        self.config = self.root / "snf-image.conf"
        self.settings = {"IMAGE_DIR": self.images, "VARIANTS_DIR": self.variants,
                         "BACKENDS_DIR": self.backends, "BACKENDS_CONFIG_DIR": self.backends_config,
                         "HELPER_ACCEL": "tcg", "PROGRESS_INTERVAL": "1"}
        self.settings.update(settings)
        self.write_config()

    def write_config(self, **settings):
        self.settings.update(settings)
        self.config.write_text("".join(f'{key}="{value}"\n' for key, value in self.settings.items()))

    def env(self, **extra):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SNF_IMAGE_CONFIG": str(self.config)}
        env.update(extra)
        return env

    def deploy(self, *args, env=None, input=None, timeout=600):
        command = [sys.executable, str(HOST), "deploy", *map(str, args)]
        return subprocess.run(command, env=self.env(**(env or {})), input=input,
                              capture_output=True, timeout=timeout)


def last_line(result):
    text = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


class _Handler(http.server.BaseHTTPRequestHandler):
    routes = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        route = self.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        kind, data = route
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", data)
            self.end_headers()
            return
        self.send_response(200)
        if kind != "no-length":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind == "cut":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(data)
        if kind == "no-length":
            self.close_connection = True


class HttpServer:
    """http.server on 127.0.0.1:<free port>; add routes with serve()."""

    def __init__(self):
        handler = type("Handler", (_Handler,), {"routes": {}})
        self.routes = handler.routes
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def serve(self, path, data, kind="ok"):
        self.routes[path] = (kind, data)
        return self.url(path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def loop_device(backing):
    """A loop device over the file `backing`, detached afterwards."""
    require_root()
    require_programs("losetup")
    result = subprocess.run(["losetup", "--show", "-f", str(backing)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"losetup failed: {result.stderr}")
    device = result.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)

"""A real ComfyUI server for the end-to-end suite: start one (COMFYUI_DIR) or use one (COMFYUI_URL), post API-format
prompts, wait for them, watch custom events on the websocket and the server's memory."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_PACK = os.path.join(PACK_ROOT, "tests", "comfy_test_pack")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptFailed(AssertionError):
    pass


class ComfyServer:
    """`base_dir` is the server's --base-directory (models/, output/) when the test can reach its files."""

    def __init__(self, url: str, base_dir: str | None, process: subprocess.Popen | None = None,
                 log_path: str | None = None):
        self.url = url.rstrip("/")
        self.base_dir = base_dir
        self.process = process
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex
        self.events = EventStream(self.url, self.client_id)
        self.comfy_dir: str | None = None  # the ComfyUI checkout, when the test started the server

    # --- lifecycle --------------------------------------------------------------------------------------------

    @classmethod
    def start(cls, comfy_dir: str, base_dir: str, port: int | None = None, timeout: float = 180,
              extra_args: tuple[str, ...] = ()) -> "ComfyServer":
        """Start ComfyUI on the CPU with this pack and the test pack linked into base_dir/custom_nodes;
        `extra_args`: more ComfyUI command-line flags."""
        port = port or free_port()
        custom = os.path.join(base_dir, "custom_nodes")
        os.makedirs(custom, exist_ok=True)
        for name, target in (("comfyui-scaled-fp16", PACK_ROOT), ("fp16lr_test_pack", TEST_PACK)):
            link = os.path.join(custom, name)
            if not os.path.islink(link):
                os.symlink(target, link)
        python = os.path.join(comfy_dir, ".venv", "bin", "python")
        if not os.path.exists(python):
            python = "python3"
        log_path = os.path.join(base_dir, "server.log")
        log = open(log_path, "a")  # appended: a restarted server keeps the log of the first run
        proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", base_dir, "--disable-auto-launch", *extra_args],
                                cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = cls(f"http://127.0.0.1:{port}", base_dir, proc, log_path)
        server.comfy_dir = comfy_dir
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}; log:\n{server.log_tail()}")
            try:
                server.get("/system_stats")
                break
            except OSError:
                time.sleep(1)
        else:
            server.stop()
            raise RuntimeError(f"ComfyUI did not come up in {timeout} s; log:\n{server.log_tail()}")
        server.events.start()
        return server

    def stop(self) -> None:
        self.events.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def restart(self, timeout: float = 180) -> None:
        """Stop a server this object started and start it again on the same port and base directory (what a user's
        restart does: caches gone, files kept); this object keeps working."""
        assert self.process is not None and getattr(self, "comfy_dir", None), "only a server the test started"
        self.stop()
        fresh = ComfyServer.start(self.comfy_dir, self.base_dir, port=urllib.parse.urlparse(self.url).port,
                                  timeout=timeout)
        fresh.events.stop()
        self.process, self.log_path = fresh.process, fresh.log_path
        self.events = EventStream(self.url, self.client_id)
        self.events.start()

    def alive(self) -> bool:
        try:
            self.get("/system_stats")
            return True
        except OSError:
            return False

    def log_tail(self, n: int = 60) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    # --- HTTP -----------------------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: dict | None = None, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise PromptFailed(f"POST {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 1800) -> dict:
        """The history entry once the prompt finished (any outcome)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 1800) -> dict:
        """Queue, wait, and fail with the server's own error message unless it succeeded."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise PromptFailed(f"prompt failed: {json.dumps(entry['status'].get('messages'), indent=1)[:6000]}")
        return entry

    def interrupt(self) -> None:
        self.post("/interrupt")

    def free(self) -> None:
        self.post("/free", {"unload_models": True, "free_memory": True})

    def fetch_output(self, filename: str, subfolder: str = "") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": "output"})
        with urllib.request.urlopen(f"{self.url}/view?{q}", timeout=120) as r:
            return r.read()

    def version(self) -> tuple[int, ...]:
        """ComfyUI's version as numbers, e.g. (0, 8, 0)."""
        text = self.get("/system_stats")["system"]["comfyui_version"]
        return tuple(int(p) for p in text.split("-")[0].split(".") if p.isdigit())

    def log_text(self) -> str | None:
        """The whole server log, when the test started the server (None for COMFYUI_URL)."""
        if not self.log_path or not os.path.exists(self.log_path):
            return None
        with open(self.log_path, errors="replace") as f:
            return f.read()

    # --- files and memory -------------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        assert self.base_dir, "this test needs the server's base directory (COMFYUI_BASE_DIR with COMFYUI_URL)"
        return os.path.join(self.base_dir, *parts)

    def memory(self) -> dict[str, int]:
        """VmRSS, RssAnon, RssFile, VmHWM of the server process, in bytes."""
        assert self.process is not None, "memory figures need a server started by the test"
        out = {}
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[name] = int(value.split()[0]) * 1024
        return out

    def reset_peak_memory(self) -> None:
        with open(f"/proc/{self.process.pid}/clear_refs", "w") as f:
            f.write("5")


class EventStream:
    """A minimal websocket client (stdlib only) that records the server's JSON messages for this client id."""

    def __init__(self, url: str, client_id: str):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.client_id = client_id
        self.messages: list[dict] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        s = socket.create_connection((self.host, self.port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /ws?clientId={self.client_id} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake failed")
            response += chunk
        if b" 101 " not in response.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake refused: {response[:200]!r}")
        self._buffer = response.split(b"\r\n\r\n", 1)[1]
        s.settimeout(None)
        self._sock = s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _recv(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _run(self) -> None:
        try:
            while True:
                b0, b1 = self._recv(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._recv(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._recv(8))[0]
                payload = self._recv(n)
                if b0 & 0x0F == 1:  # text frame (the server never fragments these)
                    with self._lock:
                        self.messages.append(json.loads(payload))
                elif b0 & 0x0F == 8:
                    return
        except (OSError, ConnectionError, ValueError):
            return

    def of_type(self, kind: str) -> list[dict]:
        with self._lock:
            return [m["data"] for m in self.messages if m.get("type") == kind]

    def wait_for(self, kind: str, timeout: float = 600, count: int = 1) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = self.of_type(kind)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise TimeoutError(f"no '{kind}' message within {timeout} s")

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def stop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass

"""Fixtures of the end-to-end suite: a real ComfyUI server with this pack and the test pack.

COMFYUI_DIR=<ComfyUI checkout with .venv>  start a CPU server on a free port with a temporary --base-directory
COMFYUI_URL=http://host:port               use a running server (it must load this pack and tests/comfy_test_pack;
                                           tests that place model files also need COMFYUI_BASE_DIR, its base dir)
Neither set: every test here is skipped.
"""

import contextlib
import os
import shutil

import pytest

from .comfy_server import ComfyServer
from .models import write_flux, write_t5_base


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COMFYUI_DIR") or os.environ.get("COMFYUI_URL"):
        return
    skip = pytest.mark.skip(reason="end-to-end: set COMFYUI_DIR (ComfyUI checkout with .venv) or COMFYUI_URL")
    for item in items:
        if "/e2e/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    url, comfy_dir = os.environ.get("COMFYUI_URL"), os.environ.get("COMFYUI_DIR")
    if url:
        server = ComfyServer(url, os.environ.get("COMFYUI_BASE_DIR"))
        server.events.start()
        yield server
        server.stop()
        return
    with own_server(comfy_dir, tmp_path_factory, "comfy-base") as server:
        yield server


@contextlib.contextmanager
def own_server(comfy_dir, tmp_path_factory, prefix, extra_args=()):
    """A server started from `comfy_dir` on a temporary base directory, removed afterwards (FP16LR_KEEP_E2E=1 keeps
    it)."""
    base = str(tmp_path_factory.mktemp(prefix))
    server = ComfyServer.start(comfy_dir, base, extra_args=extra_args)
    try:
        yield server
    finally:
        server.stop()
        if os.environ.get("FP16LR_KEEP_E2E") != "1":
            shutil.rmtree(base, ignore_errors=True)


def model_dir(comfy, kind):
    folder = comfy.path("models", kind)
    os.makedirs(folder, exist_ok=True)
    return folder


def _test_model(comfy, kind, name, write):
    path = os.path.join(model_dir(comfy, kind), name)
    if not os.path.exists(path):
        write(path)
    return name


@pytest.fixture(scope="module")
def flux_file(comfy):
    """The FLUX-shaped BF16 test model in diffusion_models (made once per server)."""
    return _test_model(comfy, "diffusion_models", "flux-e2e.safetensors", write_flux)


@pytest.fixture(scope="module")
def t5_file(comfy):
    """The FP32 T5-base-shaped test encoder in text_encoders (made once per server)."""
    return _test_model(comfy, "text_encoders", "t5-base-e2e.safetensors", write_t5_base)

"""Fixtures of the end-to-end suite: a real ComfyUI server with this pack and the test pack.

COMFYUI_DIR=<ComfyUI checkout with .venv>  start a CPU server on a free port with a temporary --base-directory
COMFYUI_URL=http://host:port               use a running server (it must load this pack and tests/comfy_test_pack;
                                           tests that place model files also need COMFYUI_BASE_DIR, its base dir)
Neither set: every test here is skipped.
"""

import os
import shutil

import pytest

from .comfy_server import ComfyServer


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
    base = str(tmp_path_factory.mktemp("comfy-base"))
    server = ComfyServer.start(comfy_dir, base)
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

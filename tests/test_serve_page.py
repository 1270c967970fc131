"""The web chat page in headless Chromium (Debian's `chromium`; .ci/run installs it), driven over the
DevTools protocol: send a message with an image, read the streamed answer from the page, save a
screenshot to runs/test-artifacts/chat_page.png."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_serve import serve

ARTIFACTS = Path(__file__).resolve().parent.parent / "runs" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's package)")
def test_chat_page_streams_an_answer_about_an_image(tiny_tokenizer, tmp_path):
    srv, engine = serve(tiny_tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    browser = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}",
                                "--window-size=900,700", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        targets = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2) as r:
                    targets = [t for t in json.loads(r.read()) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert targets, "chromium did not open its DevTools endpoint"
        dt = DevTools(targets[0]["webSocketDebuggerUrl"])
        dt.call("Page.enable")
        dt.call("Page.navigate", url=srv.url + "/")
        for _ in range(100):
            if dt.js("document.readyState") == "complete" and dt.js("!!document.getElementById('f')"):
                break
            time.sleep(0.1)
        img = tmp_path / "scene.png"
        Image.fromarray(np.full((32, 32, 3), (200, 40, 40), np.uint8)).save(img)
        doc = dt.call("DOM.getDocument")
        node = dt.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#image")["nodeId"]
        dt.call("DOM.setFileInputFiles", nodeId=node, files=[str(img)])
        dt.js("document.getElementById('text').value = 'what color is the circle?';"
              "document.getElementById('f').requestSubmit(); true")
        for _ in range(300):
            if dt.js("window.vlkitDone === true"):
                break
            time.sleep(0.1)
        answer = dt.js("document.querySelector('#log .assistant, #log .error').textContent")
        assert answer.startswith("model: ") and len(answer) > len("model: "), answer
        assert dt.js("document.querySelector('#log .user img.thumb') !== null")  # the image was sent and shown
        # the page showed what the API answers for the same image and question
        direct = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(img)}},
            {"type": "text", "text": "what color is the circle?"}]}])  # the server's default max_tokens, as the page
        assert answer[len("model: "):].strip() == direct.choices[0].message.content
        shot = dt.call("Page.captureScreenshot", format="png")["data"]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "chat_page.png").write_bytes(base64.b64decode(shot))
        assert (ARTIFACTS / "chat_page.png").stat().st_size > 1000
    finally:
        browser.terminate()
        browser.wait(timeout=10)
        srv.close()
        engine.close()


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


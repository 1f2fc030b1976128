"""``--launch`` (``loadtests.launch.launched``) against a stand-in for ``serve run``: a real process
that serves ``GET /v1/models`` on the config's port and, like Ray's HTTP proxy, leaves a process
behind that holds the port for a moment after ``serve run`` itself has exited. ``bench-autoscale``
launches its configs one after another, so the second launch must wait for the port."""

import socket
import sys
import textwrap
import time

import pytest

from loadtests import launch
from tests.ports import free_port

LINGER_S = 2.0


@pytest.fixture
def fake_serve(tmp_path, monkeypatch):
    script = tmp_path / "serve"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f'''
        import http.server, signal, socket, subprocess, sys, threading, time, yaml
        port = yaml.safe_load(open(sys.argv[2]))["http_options"]["port"]

        class Models(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.end_headers()
            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", port), Models)
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        stop.wait()
        server.shutdown()
        server.server_close()
        # what Ray leaves behind: a process in its own session that still listens for a while
        holder = (f"import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                  f"s.bind(('127.0.0.1', {{port}})); s.listen(); time.sleep({LINGER_S})")
        subprocess.Popen([sys.executable, "-c", holder], start_new_session=True)
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            time.sleep(0.05)
    '''))
    script.chmod(0o755)
    monkeypatch.setattr(launch, "_serve_binary", lambda: str(script))
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(f"http_options:\n  host: 127.0.0.1\n  port: {port}\napplications: []\n")
    return config, f"http://127.0.0.1:{port}"


def test_launch_twice_in_a_row_waits_for_the_port_the_last_service_left_behind(fake_serve, tmp_path):
    config, url = fake_serve
    with launch.launched(config, tmp_path / "first.log") as got:
        assert got == url and launch._port_open(url)
    assert not launch._port_open(url)  # the holder is gone before launched() returns
    with launch.launched(config, tmp_path / "second.log") as got:  # refused before the wait was added
        assert got == url
    assert not launch._port_open(url)


def test_wait_closed_gives_up_after_its_timeout_while_something_listens(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        started = time.monotonic()
        assert launch._wait_closed(url, timeout=0.5, poll_s=0.1) is False
        assert 0.5 <= time.monotonic() - started < 5
    assert launch._wait_closed(url, timeout=0.5) is True


def test_launch_refuses_a_port_someone_else_holds(fake_serve):
    config, url = fake_serve
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(RuntimeError, match="already listens"):
            with launch.launched(config):
                pass

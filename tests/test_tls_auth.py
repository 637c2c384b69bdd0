"""TLS (mqtts://) and username/password against a real Mosquitto configured for them."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from rkmqtt.mqtt.broker import Mosquitto
from rkmqtt.service import Service
from tests.conftest import bridge_settings
from tests.fake_engine import FakeEngine


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certs(d: Path, san: str = "DNS:localhost,IP:127.0.0.1") -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=rkmqtt test CA", cwd=d)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=d)  # fmt: skip
    (d / "san.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)  # fmt: skip


def test_tls_with_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _make_certs(tmp_path)
    pwfile = tmp_path / "passwd"
    pwfile.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "bridge", "s3cret"], check=True, timeout=30)
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "device", "devpw"], check=True, timeout=30)
    tls = Mosquitto(workdir=tmp_path / "broker", extra_config=(
        f"password_file {pwfile}\ncafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\n"
        f"keyfile {tmp_path / 'server.key'}\n"))  # fmt: skip
    tls.start()
    try:
        settings = bridge_settings(
            f"mqtts://bridge:s3cret@localhost:{tls.port}", "tls", tls_ca=str(tmp_path / "ca.crt")
        )
        svc = Service(settings, engine=FakeEngine())
        svc.start()
        try:
            assert svc.bridge is not None and svc.bridge.wait_connected(15)
            out = subprocess.run(
                ["mosquitto_rr", "-h", "localhost", "-p", str(tls.port), "--cafile", str(tmp_path / "ca.crt"),
                 "-u", "device", "-P", "devpw", "-t", "tls/request/dev", "-e", "tls/reply/dev/t1",
                 "-m", '{"id": "t1", "prompt": "secure hello"}', "-W", "10"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert '"text":"secure hello "' in out.stdout, out.stderr
        finally:
            svc.stop(grace_s=0)
        # A wrong password, a CA that did not sign the broker's certificate, a name the certificate is
        # not for: each is refused, said once in one line naming the cause, and retried without a crash.
        other = tmp_path / "other"
        other.mkdir()
        _make_certs(other, san="DNS:elsewhere.example")
        conf = f"cafile {other / 'ca.crt'}\ncertfile {other / 'server.crt'}\nkeyfile {other / 'server.key'}\n"
        misnamed = Mosquitto(workdir=tmp_path / "misnamed", extra_config=conf)
        misnamed.start()
        for url, ca, cause in (
            (f"mqtts://bridge:wrong@localhost:{tls.port}", tmp_path / "ca.crt", "not authorised (check the user"),
            (f"mqtts://bridge:s3cret@localhost:{tls.port}", other / "ca.crt", "certificate was not accepted"),
            (f"mqtts://localhost:{misnamed.port}", other / "ca.crt", "certificate is not for this host name"),
        ):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="rkmqtt.mqtt.link"):
                bad = Service(bridge_settings(url, "tls", tls_ca=str(ca)), engine=FakeEngine())
                bad.start()
                try:
                    assert bad.bridge is not None and not bad.bridge.wait_connected(3)
                finally:
                    bad.stop(grace_s=0)
            lines = [r.getMessage() for r in caplog.records if r.name == "rkmqtt.mqtt.link"]
            assert len(lines) == 1 and cause in lines[0] and url.rsplit(":", 1)[1] in lines[0], lines
        misnamed.close()
    finally:
        tls.close()

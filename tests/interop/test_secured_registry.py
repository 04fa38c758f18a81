"""The three services through a Schema Registry behind TLS and authentication, with the settings a
user would write, and no secret of theirs ever shown.

nginx from Debian (nginx-light) sits in front of the stack's registry: TLS with a certificate
signed by a CA this test makes with openssl, one listener with basic auth (an htpasswd file), one
that wants a bearer token. The services get `SCHEMA_REGISTRY_URL` (https), the CA in
`SCHEMA_REGISTRY_SSL_CA_LOCATION` and the credentials in `SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`,
`SCHEMA_REGISTRY_BEARER_AUTH_TOKEN` or the URL itself. Runs: the whole pipeline over basic auth
(exactly-once) and over a bearer token (at-least-once), with exact totals against the ground
truth; then what a user who got a setting wrong sees: no credentials, a wrong password, no CA.
Every known secret (the registry password and token, and Kafka passwords given through
`RDKAFKA_*`) is looked for in every log line at debug level, in `/metrics`, `/stats`, `/report`
and `/status.json`, and in the error messages: none may appear.
"""

import base64
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from support import free_port, get_json, unique, wait_for  # noqa: E402
from truth import BOOTSTRAP, REGISTRY, check_totals, create_topics  # noqa: E402

BIN = ROOT / "target" / "debug"
USER = "orders-app"
PASSWORD = f"pw-{uuid.uuid4().hex}"
TOKEN = f"tok-{uuid.uuid4().hex}"
# Kafka secrets as a user would pass them; the plaintext broker ignores them, the services must
# still never show them
KAFKA_SECRETS = {"RDKAFKA_SASL_PASSWORD": f"sasl-{uuid.uuid4().hex}",
                 "RDKAFKA_SSL_KEY_PASSWORD": f"key-{uuid.uuid4().hex}"}
SECRETS = [PASSWORD, TOKEN, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), *KAFKA_SECRETS.values()]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def secured():
    """nginx with TLS in front of the stack's registry: {"basic": url, "bearer": url, "ca": path}."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx):
        pytest.fail("nginx is not installed (Debian's nginx-light; .ci/run installs it)")
    upstream = urllib.parse.urlsplit(REGISTRY)
    d = pathlib.Path(f"/tmp/{unique('op-registry-tls')}")
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=order-pipeline test CA", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    hashed = subprocess.run(["openssl", "passwd", "-apr1", "-stdin"], input=PASSWORD, capture_output=True,
                            text=True, check=True).stdout.strip()
    (d / "htpasswd").write_text(f"{USER}:{hashed}\n")
    basic, bearer = free_port(), free_port()
    tls = f"ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key;"
    proxy = (f"proxy_pass http://{upstream.netloc}; proxy_set_header Authorization \"\";"
             " proxy_set_header Host $host;")
    temp = " ".join(f"{k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (d / "nginx.conf").write_text(f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log {d}/access.log;
  {temp}
  server {{
    listen 127.0.0.1:{basic} ssl; {tls}
    location / {{ auth_basic "schema registry"; auth_basic_user_file {d}/htpasswd; {proxy} }}
  }}
  server {{
    listen 127.0.0.1:{bearer} ssl; {tls}
    location / {{
      if ($http_authorization != "Bearer {TOKEN}") {{ return 401; }}
      {proxy}
    }}
  }}
}}
""")
    proc = subprocess.Popen([nginx, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log"),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for("nginx listening", lambda: proc.poll() is None and _listening(basic) and _listening(bearer), 20)
        path = upstream.path
        yield {"basic": f"https://127.0.0.1:{basic}{path}", "bearer": f"https://127.0.0.1:{bearer}{path}",
               "ca": str(d / "ca.pem"), "dir": d}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(d, ignore_errors=True)


def _listening(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def env_for(orders, dlq, registry, **extra):
    env = {"PATH": os.environ["PATH"], "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP, "SCHEMA_REGISTRY_URL": registry,
           "ORDERS_TOPIC": orders, "DLQ_TOPIC": dlq, "RUST_LOG": "debug", **KAFKA_SECRETS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def assert_no_secret(where, text):
    for secret in SECRETS:
        assert secret not in text, f"a secret appears in {where}"


def run_pipeline(registry, auth, guarantee):
    orders, dlq = unique("sec-orders"), unique("sec-dlq")
    create_topics(orders, dlq)
    ports = {name: free_port() for name in ("generator", "processor", "analyzer")}
    logs = {}
    procs = {}
    common = {**auth, "PROCESSING_GUARANTEE": guarantee, "RETRY_INITIAL_BACKOFF_MS": 50}
    try:
        for name, binary, extra in (
            ("processor", "order-processor", {"CONSUMER_GROUP": unique("sec-processor"), "TRANSIENT_FAILURE_RATE": "0.2",
                                              "ANALYZER_URL": f"http://127.0.0.1:{ports['analyzer']}"}),
            ("analyzer", "dlq-analyzer", {"CONSUMER_GROUP": unique("sec-analyzer")}),
            ("generator", "order-generator", {"ORDER_COUNT": 300, "ORDER_RATE": 0, "INVALID_ORDER_RATIO": "0.1"}),
        ):
            logs[name] = open(f"/tmp/{orders}-{name}.log", "w+")
            procs[name] = subprocess.Popen([BIN / binary], env=env_for(orders, dlq, registry, HTTP_PORT=ports[name],
                                                                         **common, **extra),
                                           stdout=logs[name], stderr=subprocess.STDOUT)
        assert procs["generator"].wait(120) == 0, "the generator failed"
        totals = "/stats/global" if guarantee == "exactly_once" else "/stats"
        processed, dead = check_totals(orders, dlq, ports["processor"], ports["analyzer"], totals)
        assert processed > 200 and dead > 0, (processed, dead)
        # what an operator can read, while they run
        for name, paths in (("processor", ["/metrics", "/stats", totals, "/status.json"]),
                            ("analyzer", ["/metrics", "/report"])):
            for path in paths:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[name]}{path}", timeout=10) as r:
                    assert_no_secret(f"{name} {path}", r.read().decode())
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
    for name, f in logs.items():
        f.seek(0)
        text = f.read()
        f.close()
        os.unlink(f.name)
        assert_no_secret(f"the {name}'s log", text)
        if name == "generator":
            assert "Order schema registered" in text, "the generator did not register through the secured registry"
    return processed, dead


def test_the_pipeline_over_a_tls_registry_with_basic_auth_exactly_once(secured):
    processed, dead = run_pipeline(secured["basic"], {
        "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": f"{USER}:{PASSWORD}",
        "SCHEMA_REGISTRY_SSL_CA_LOCATION": secured["ca"]}, "exactly_once")
    print(f"basic auth over TLS, exactly-once: {processed} processed, {dead} dead-lettered, exact")


def test_the_pipeline_over_a_tls_registry_with_a_bearer_token_at_least_once(secured):
    processed, dead = run_pipeline(secured["bearer"], {
        "SCHEMA_REGISTRY_BEARER_AUTH_TOKEN": TOKEN,
        "SCHEMA_REGISTRY_SSL_CA_LOCATION": secured["ca"]}, "at_least_once")
    print(f"bearer token over TLS, at-least-once: {processed} processed, {dead} dead-lettered, exact")


def start_once(registry, **auth):
    """The generator against `registry`: (exit code, output, seconds)."""
    orders = unique("sec-fail")
    t = time.time()
    run = subprocess.run([BIN / "order-generator"],
                         env=env_for(orders, orders + "-dlq", registry, HTTP_PORT=free_port(), ORDER_COUNT=1, **auth),
                         capture_output=True, text=True, timeout=60)
    return run.returncode, run.stdout + run.stderr, time.time() - t


def test_wrong_or_missing_settings_stop_at_once_naming_the_variable(secured):
    ca = {"SCHEMA_REGISTRY_SSL_CA_LOCATION": secured["ca"]}
    cases = [
        ("no credentials", secured["basic"], ca, "wants credentials (401 Unauthorized): set SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"),
        ("a wrong password", secured["basic"], {**ca, "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": f"{USER}:not-{PASSWORD}"},
         "refused the credentials from SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO (401 Unauthorized)"),
        ("a wrong token", secured["bearer"], {**ca, "SCHEMA_REGISTRY_BEARER_AUTH_TOKEN": f"x{TOKEN}"},
         "refused the credentials from SCHEMA_REGISTRY_BEARER_AUTH_TOKEN"),
        ("no CA", secured["basic"], {"SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": f"{USER}:{PASSWORD}"},
         "Set SCHEMA_REGISTRY_SSL_CA_LOCATION"),
        ("user info without a colon", secured["basic"], {**ca, "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": PASSWORD},
         "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO must be user:password"),
    ]
    for what, registry, auth, expected in cases:
        code, output, took = start_once(registry, **auth)
        assert code != 0, f"{what}: the generator started"
        assert expected in output, f"{what}: {output[-2000:]}"
        assert took < 20, f"{what}: took {took:.1f} s to fail"
        assert_no_secret(f"the output with {what}", output)
        print(f"{what}: exit {code} in {took:.1f} s: ...{expected}...")


def test_credentials_in_the_url_work_and_are_never_shown(secured):
    split = urllib.parse.urlsplit(secured["basic"])
    with_creds = split._replace(netloc=f"{USER}:{urllib.parse.quote(PASSWORD)}@{split.netloc}").geturl()
    code, output, _ = start_once(with_creds, SCHEMA_REGISTRY_SSL_CA_LOCATION=secured["ca"])
    assert code == 0, output[-2000:]
    assert_no_secret("the generator's output with credentials in the URL", output)
    # a refusal names the URL without them
    code, output, _ = start_once(split._replace(netloc=f"{USER}:wrong@{split.netloc}").geturl(),
                                 SCHEMA_REGISTRY_SSL_CA_LOCATION=secured["ca"])
    assert code != 0 and "refused the credentials from SCHEMA_REGISTRY_URL" in output, output[-2000:]
    assert "wrong" not in output.split("refused")[0][-200:], "the URL's password is shown"

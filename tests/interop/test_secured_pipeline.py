"""The three services against a secured Kafka and a secured Schema Registry, with the settings a
user would write, and no secret of theirs ever shown.

Kafka: the stack's secured listener (stack/stack.sh: TLS with the stack's CA, SASL/SCRAM-SHA-512,
ACLs enforced). Each service gets a SCRAM user of its own that may do only what docs/security.md's
"Kafka ACLs" table grants (ACLS below, created here with the Admin API over the plaintext
listener, as an operator or Strimzi's KafkaUser would), and the settings of `stack.sh
secure-env`: `RDKAFKA_SECURITY_PROTOCOL=SASL_SSL`, `RDKAFKA_SASL_MECHANISM=SCRAM-SHA-512`,
`RDKAFKA_SASL_USERNAME`, `RDKAFKA_SASL_PASSWORD`, `RDKAFKA_SSL_CA_LOCATION`.

Registry: nginx from Debian (nginx-light) in front of the stack's registry, with TLS from a CA this
test makes with openssl, one listener with basic auth (an htpasswd file), one that wants a bearer
token. The services get `SCHEMA_REGISTRY_URL` (https), the CA in `SCHEMA_REGISTRY_SSL_CA_LOCATION`
and the credentials in `SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO`, `SCHEMA_REGISTRY_BEARER_AUTH_TOKEN`
or the URL itself.

Runs: the whole pipeline over both, exactly-once (basic auth) and at-least-once (a token), with
exact totals against the ground truth; then what a user who got a setting wrong sees, for the
registry and for Kafka: each stops at once, naming what to fix. Every known secret (the registry
password and token, the SCRAM passwords) is looked for in every log line at debug level, in
`/metrics`, `/stats`, `/report` and `/status.json`, and in the error messages: none may appear.
"""

import base64
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
from confluent_kafka.admin import (AclBinding, AclBindingFilter, AclOperation, AclPermissionType, AdminClient,
                                   ResourcePatternType, ResourceType, ScramCredentialInfo, ScramMechanism,
                                   UserScramCredentialDeletion, UserScramCredentialUpsertion)

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from support import free_port, get_json, unique, wait_for  # noqa: E402
from truth import BOOTSTRAP, REGISTRY, Failures, check_totals, create_topics  # noqa: E402

BIN = ROOT / "target" / "debug"
USER = "orders-app"
PASSWORD = f"pw-{uuid.uuid4().hex}"
TOKEN = f"tok-{uuid.uuid4().hex}"
SERVICES = ("generator", "processor", "analyzer")
# each service's SCRAM user and password on the secured listener
KAFKA_USERS = {name: (unique(f"op-{name}"), f"scram-{uuid.uuid4().hex}") for name in SERVICES}
# a key password as a user with client certificates would pass it: never to be shown either
KEY_PASSWORD = f"key-{uuid.uuid4().hex}"
# the operations credential (pause, resume, redrive) the processor and the analyzer take
OPERATIONS_TOKEN = f"ops-{uuid.uuid4().hex}"
SECRETS = [PASSWORD, TOKEN, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(), KEY_PASSWORD,
           OPERATIONS_TOKEN, *(pw for _, pw in KAFKA_USERS.values())]

T, G, X = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.TRANSACTIONAL_ID
LIT, PRE = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
R, W, D, C = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE, AclOperation.CREATE


def acls(n):
    """What each service may do, for the names in `n` (docs/security.md, "Kafka ACLs"; the defaults there)."""
    return {
        "generator": [(T, n["orders"], LIT, (W, D))],
        "processor": [(T, n["orders"], LIT, (R, D)), (T, n["dlq"], LIT, (W, D)),
                      # the changelog of per-partition state (exactly-once), which it creates
                      (T, f"{n['processor_group']}-aggregates-changelog", LIT, (R, W, D, C)),
                      (G, n["processor_group"], LIT, (R, D)),
                      # transactional ids <CONSUMER_GROUP>-<instance> (exactly-once)
                      (X, n["processor_group"], PRE, (W, D))],
        "analyzer": [(T, n["dlq"], LIT, (R, D)), (G, n["analyzer_group"], LIT, (R, D)),
                     # redrive: back to the orders topic, one group and transactional id per request
                     (T, n["orders"], LIT, (W, D)), (G, "dlq-analyzer-redrive-", PRE, (R, D)),
                     (X, "dlq-analyzer-redrive-", PRE, (W, D))],
    }


def secure_env():
    """The stack's secured listener as `stack.sh secure-env` prints it."""
    out = subprocess.run(["bash", str(ROOT / "stack" / "stack.sh"), "secure-env"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))


@pytest.fixture(scope="module")
def kafka_users():
    """One SCRAM-SHA-512 user per service, with no rights until `grant`; all removed afterwards.
    Yields (the secured listener's settings without a user, grant(names))."""
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    upserts = [UserScramCredentialUpsertion(user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), pw.encode())
               for user, pw in KAFKA_USERS.values()]
    for f in admin.alter_user_scram_credentials(upserts).values():
        f.result(timeout=30)
    env = secure_env()
    listener = {k: v for k, v in env.items() if k not in ("RDKAFKA_SASL_USERNAME", "RDKAFKA_SASL_PASSWORD")}

    def grant(names):
        bindings = [AclBinding(kind, name, pattern, f"User:{KAFKA_USERS[svc][0]}", "*", op, AclPermissionType.ALLOW)
                    for svc, rules in acls(names).items() for kind, name, pattern, ops in rules for op in ops]
        for f in admin.create_acls(bindings).values():
            f.result(timeout=30)

    try:
        yield listener, grant
    finally:
        filters = [AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, f"User:{user}", None,
                                    AclOperation.ANY, AclPermissionType.ANY) for user, _ in KAFKA_USERS.values()]
        for f in admin.delete_acls(filters).values():
            f.result(timeout=30)
        deletions = [UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_512) for user, _ in KAFKA_USERS.values()]
        for f in admin.alter_user_scram_credentials(deletions).values():
            f.result(timeout=30)


def fresh_names(grant):
    """A run's own topics (created) and groups, with each service's user granted its ACLs on them."""
    names = {"orders": unique("sec-orders"), "dlq": unique("sec-dlq"), "processor_group": unique("sec-processor"),
             "analyzer_group": unique("sec-analyzer")}
    create_topics(names["orders"], names["dlq"])
    grant(names)
    return names


def kafka_settings(listener, service):
    user, password = KAFKA_USERS[service]
    return {**listener, "RDKAFKA_SASL_USERNAME": user, "RDKAFKA_SASL_PASSWORD": password}


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
           "ORDERS_TOPIC": orders, "DLQ_TOPIC": dlq, "RUST_LOG": "debug"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def assert_no_secret(where, text):
    for secret in SECRETS:
        assert secret not in text, f"a secret appears in {where}"


def run_pipeline(registry, auth, guarantee, kafka):
    """The three services through `registry` with `auth`, and Kafka's secured listener as each
    service's own user (`kafka` from the fixture): (processed, dead-lettered), exact."""
    listener, grant = kafka
    names = fresh_names(grant)
    orders, dlq = names["orders"], names["dlq"]
    ports = {name: free_port() for name in SERVICES}
    logs = {}
    procs = {}
    failures = Failures(unique("seed"), 0.2)
    common = {**auth, "PROCESSING_GUARANTEE": guarantee, "RETRY_INITIAL_BACKOFF_MS": 50,
              "OPERATIONS_TOKEN": OPERATIONS_TOKEN}
    try:
        for name, binary, extra in (
            ("processor", "order-processor", {"CONSUMER_GROUP": names["processor_group"], **failures.env(),
                                              "ANALYZER_URL": f"http://127.0.0.1:{ports['analyzer']}"}),
            ("analyzer", "dlq-analyzer", {"CONSUMER_GROUP": names["analyzer_group"]}),
            ("generator", "order-generator", {"ORDER_COUNT": 300, "ORDER_RATE": 0, "INVALID_ORDER_RATIO": "0.1"}),
        ):
            logs[name] = open(f"/tmp/{orders}-{name}.log", "w+")
            env = env_for(orders, dlq, registry, HTTP_PORT=ports[name], **common, **kafka_settings(listener, name),
                          **extra)
            procs[name] = subprocess.Popen([BIN / binary], env=env, stdout=logs[name], stderr=subprocess.STDOUT)
        assert procs["generator"].wait(120) == 0, "the generator failed"
        totals = "/stats/global" if guarantee == "exactly_once" else "/stats"
        processed, dead = check_totals(orders, dlq, ports["processor"], ports["analyzer"], failures, totals)
        assert processed > 200 and dead > 0, (processed, dead)
        if guarantee == "exactly_once":
            # a redrive through the analyzer's user: its group and transactional id, and the orders topic
            redrive = subprocess.run([BIN / "dlq-analyzer", "redrive", "--all", "--limit", "5"],
                                     env=env_for(orders, dlq, registry, **common, **kafka_settings(listener, "analyzer"),
                                                 CONSUMER_GROUP=names["analyzer_group"]),
                                     capture_output=True, text=True, timeout=120)
            assert redrive.returncode == 0, redrive.stdout[-2000:] + redrive.stderr[-2000:]
            assert "redriven   5" in redrive.stdout, redrive.stdout
            assert_no_secret("the redrive's output", redrive.stdout + redrive.stderr)
        # operations: refused without the credential, with a wrong one or from another site, done with
        # it; no answer (refusal or not) shows the token
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong-token-0123456789"}, 403),
                                ({"Authorization": f"Bearer {OPERATIONS_TOKEN}", "Origin": "http://evil.example"}, 403),
                                ({"Authorization": f"Bearer {OPERATIONS_TOKEN}"}, 200)):
            for name, path in (("processor", "/pause?partition=0"), ("processor", "/resume?partition=0"),
                               ("analyzer", "/redrive")):
                body = b'{"kind": "no_such_kind", "dry_run": true}' if name == "analyzer" else None
                request = urllib.request.Request(f"http://127.0.0.1:{ports[name]}{path}", data=body, method="POST",
                                                 headers={**headers, **({"Content-Type": "application/json"} if body else {})})
                try:
                    with urllib.request.urlopen(request, timeout=30) as r:
                        got, text = r.status, r.read().decode()
                except urllib.error.HTTPError as e:
                    got, text = e.code, e.read().decode()
                assert got == status, (name, path, headers.keys(), got, text)
                assert_no_secret(f"the {name}'s answer to POST {path}", text)
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


def test_exactly_once_over_tls_and_scram_with_a_basic_auth_tls_registry(secured, kafka_users):
    processed, dead = run_pipeline(secured["basic"], {
        "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO": f"{USER}:{PASSWORD}",
        "SCHEMA_REGISTRY_SSL_CA_LOCATION": secured["ca"]}, "exactly_once", kafka_users)
    print(f"Kafka over TLS + SCRAM with ACLs, registry over TLS with basic auth, exactly-once: "
          f"{processed} processed, {dead} dead-lettered, exact")


def test_at_least_once_over_tls_and_scram_with_a_token_tls_registry(secured, kafka_users):
    processed, dead = run_pipeline(secured["bearer"], {
        "SCHEMA_REGISTRY_BEARER_AUTH_TOKEN": TOKEN,
        "SCHEMA_REGISTRY_SSL_CA_LOCATION": secured["ca"]}, "at_least_once", kafka_users)
    print(f"Kafka over TLS + SCRAM with ACLs, registry over TLS with a token, at-least-once: "
          f"{processed} processed, {dead} dead-lettered, exact")


def start_once(registry, **auth):
    """The generator against `registry`, its topic made first (it waits for a missing one):
    (exit code, output, seconds)."""
    orders = unique("sec-fail")
    create_topics(orders, orders + "-dlq")
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


def test_wrong_kafka_settings_stop_at_once_naming_what_to_fix(kafka_users):
    listener, _ = kafka_users
    user, password = KAFKA_USERS["generator"]
    sasl = {**listener, "RDKAFKA_SASL_USERNAME": user, "RDKAFKA_SASL_PASSWORD": password,
            "RDKAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD}
    cases = [
        ("no security settings", {"KAFKA_BOOTSTRAP_SERVERS": listener["KAFKA_BOOTSTRAP_SERVERS"]},
         "check RDKAFKA_SECURITY_PROTOCOL"),
        ("a wrong password", {**sasl, "RDKAFKA_SASL_PASSWORD": f"not-{password}"},
         "invalid credentials with SASL mechanism SCRAM-SHA-512 (after"),
        ("no password", {k: v for k, v in sasl.items() if k != "RDKAFKA_SASL_PASSWORD"},
         "sasl.username and sasl.password must be set"),
        ("no CA", {k: v for k, v in sasl.items() if k != "RDKAFKA_SSL_CA_LOCATION"},
         "certificate verify failed"),
        ("TLS and SASL at the plaintext listener", {**sasl, "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP},
         "check RDKAFKA_SECURITY_PROTOCOL"),
        ("a user without ACLs on the topic", sasl, "TopicAuthorizationFailed"),
    ]
    for what, settings, expected in cases:
        code, output, took = start_once(REGISTRY, **settings)
        assert code != 0, f"{what}: the generator started"
        assert "the Kafka cluster at" in output and expected in output, f"{what}: {output[-2000:]}"
        assert took < 20, f"{what}: took {took:.1f} s to fail"
        assert_no_secret(f"the output with {what}", output)
        print(f"{what}: exit {code} in {took:.1f} s: ...{expected}...")


def test_a_registry_refusing_at_run_time_is_logged_and_counted(secured, kafka_users):
    """The analyzer keeps running while the registry's password is rotated under it: /readyz says
    the registry is unreachable, `service_dependency_refused` says why, and a warning names the
    variable; back to normal once the password matches again."""
    listener, grant = kafka_users
    names = fresh_names(grant)
    orders, dlq = names["orders"], names["dlq"]
    htpasswd = secured["dir"] / "htpasswd"
    kept = htpasswd.read_text()
    port = free_port()
    env = env_for(orders, dlq, secured["basic"], HTTP_PORT=port, CONSUMER_GROUP=names["analyzer_group"],
                  SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO=f"{USER}:{PASSWORD}",
                  SCHEMA_REGISTRY_SSL_CA_LOCATION=secured["ca"], **kafka_settings(listener, "analyzer"))
    series = 'service_dependency_refused{dependency="schema_registry"}'

    def metric():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return next(line.split()[-1] for line in r.read().decode().splitlines() if line.startswith(series))

    with open(f"/tmp/{orders}-analyzer.log", "w+") as log:
        proc = subprocess.Popen([BIN / "dlq-analyzer"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for("the analyzer ready", lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz",
                                                                          timeout=5).status == 200, 60)
            assert metric() == "0"
            # the password is rotated at the registry, not yet in the service
            hashed = subprocess.run(["openssl", "passwd", "-apr1", "-stdin"], input=f"new-{PASSWORD}",
                                    capture_output=True, text=True, check=True).stdout.strip()
            htpasswd.write_text(f"{USER}:{hashed}\n")
            wait_for("the refusal in /metrics", lambda: metric() == "1", 30)
            with pytest.raises(urllib.error.HTTPError) as unready:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
            assert "schema registry reachable" in unready.value.read().decode()
            htpasswd.write_text(kept)
            wait_for("the refusal cleared", lambda: metric() == "0", 30)
        finally:
            htpasswd.write_text(kept)
            proc.terminate()
            proc.wait(30)
        log.seek(0)
        text = log.read()
    os.unlink(log.name)
    assert "the schema registry refuses our credentials" in text and "SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO" in text
    assert_no_secret("the analyzer's log", text)
    print(f"a rotated registry password: {series} went 0 -> 1 -> 0, /readyz unready meanwhile, warning logged")

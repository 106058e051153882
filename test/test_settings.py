"""Settings from arguments and environment: one table, plus the usage text."""

import re
from pathlib import Path

import pytest

import k8svent

README = Path(__file__).resolve().parent.parent / "README.md"


def settings(argv, environ=None):
    return k8svent.settings_from(k8svent.parse_arguments(argv), environ or {})


@pytest.mark.parametrize(
    "argv, environ, field, expected",
    [
        (["-u", "http://a"], {}, "urls", ("http://a",)),
        (["--url=http://a", "--url=https://b"], {}, "urls", ("http://a", "https://b")),
        ([], {"K8SVENT_WEBHOOKS": "http://a, https://b"}, "urls", ("http://a", "https://b")),
        # flags replace the variable's list, they do not add to it
        (["-u", "http://flag"], {"K8SVENT_WEBHOOKS": "http://env"}, "urls", ("http://flag",)),
        (["--dry-run"], {}, "urls", ()),
        (["-u", "http://a"], {}, "secret", None),
        (["-u", "http://a", "-s", "flag"], {"K8SVENT_WEBHOOK_SECRET": "env"}, "secret", "flag"),
        (["-u", "http://a"], {"K8SVENT_WEBHOOK_SECRET": "env"}, "secret", "env"),
        (["-u", "http://a"], {}, "namespace", None),
        (["-u", "http://a", "-n", "flag"], {"K8SVENT_NAMESPACE": "env"}, "namespace", "flag"),
        (["-u", "http://a"], {"K8SVENT_NAMESPACE": "env"}, "namespace", "env"),
        (["-u", "http://a"], {}, "log_level", "info"),
        (["-u", "http://a", "--namespace="], {}, "namespace", None),
        (["-u", "http://a"], {}, "exclude_namespaces", ()),
        (
            ["-u", "http://a", "--exclude-namespace=b", "--exclude-namespace", "a"],
            {"K8SVENT_EXCLUDE_NAMESPACES": "env"},
            "exclude_namespaces",
            ("a", "b"),
        ),
        (
            ["-u", "http://a"],
            {"K8SVENT_EXCLUDE_NAMESPACES": "kube-system, ,x,kube-system"},
            "exclude_namespaces",
            ("kube-system", "x"),
        ),
        (["-u", "http://a"], {}, "selector", None),
        (["-u", "http://a", "--selector="], {}, "selector", None),
        (
            ["-u", "http://a", "--selector=app=web"],
            {"K8SVENT_SELECTOR": "env"},
            "selector",
            "app=web",
        ),
        (
            ["-u", "http://a"],
            {"K8SVENT_SELECTOR": " app = web , tier!=cache "},
            "selector",
            "app=web,tier!=cache",
        ),
        (
            ["-u", "http://a"],
            {"K8SVENT_SELECTOR": "env in ( staging, prod )"},
            "selector",
            "env in (prod,staging)",
        ),
        (["-u", "http://a", "-l", "DEBUG"], {"K8SVENT_LOG_LEVEL": "error"}, "log_level", "debug"),
        (["-u", "http://a"], {"K8SVENT_LOG_LEVEL": "warning"}, "log_level", "warning"),
        (["-u", "http://a"], {"K8SVENT_LOG_FORMAT": "json"}, "log_format", "json"),
        (["-u", "http://a"], {}, "listen", None),
        (
            ["-u", "http://a", "--listen=0.0.0.0:8080"],
            {"K8SVENT_LISTEN": "127.0.0.1:1"},
            "listen",
            ("0.0.0.0", 8080),
        ),
        (["-u", "http://a"], {"K8SVENT_LISTEN": "127.0.0.1:0"}, "listen", ("127.0.0.1", 0)),
        (["-u", "http://a", "--listen=localhost:9090"], {}, "listen", ("localhost", 9090)),
        (["-u", "http://a", "--listen=[::1]:8080"], {}, "listen", ("::1", 8080)),
        (["-u", "http://a"], {}, "interval", 120.0),
        (["-u", "http://a", "--interval=5"], {"K8SVENT_INTERVAL": "7"}, "interval", 5.0),
        (["-u", "http://a"], {"K8SVENT_INTERVAL": "7"}, "interval", 7.0),
        (["-u", "http://a"], {}, "retry_interval", 30.0),
        (["-u", "http://a", "--retry-interval=0.5"], {}, "retry_interval", 0.5),
        (["-u", "http://a"], {}, "kubectl", "kubectl"),
        (["-u", "http://a", "--kubectl=/k"], {"K8SVENT_KUBECTL": "/e"}, "kubectl", "/k"),
        (["-u", "http://a", "--context=c"], {}, "context", "c"),
        (["-u", "http://a"], {}, "chunk_size", 5000),
        (["-u", "http://a"], {}, "workers", 8),
        (["-u", "http://a", "--workers=2"], {}, "workers", 2),
        (["-u", "http://a"], {}, "retry_budget", 900.0),
        (["-u", "http://a"], {"K8SVENT_STATE": "/s.db"}, "state", "/s.db"),
        (["-u", "http://a", "--once"], {}, "once", True),
        (["-u", "http://a"], {}, "image", "docker.io/atomist/k8svent"),
        (
            ["-u", "http://a", "--image=ghcr.io/me/k8svent"],
            {"K8SVENT_IMAGE": "quay.io/x/y"},
            "image",
            "ghcr.io/me/k8svent",
        ),
        (["-u", "http://a"], {"K8SVENT_IMAGE": "quay.io/x/y"}, "image", "quay.io/x/y"),
        (["-u", "http://a"], {}, "upgrade", "auto"),
        (["-u", "http://a", "--upgrade=never"], {"K8SVENT_UPGRADE": "always"}, "upgrade", "never"),
        (["-u", "http://a"], {"K8SVENT_UPGRADE": "always"}, "upgrade", "always"),
        (["-u", "http://a"], {}, "upgrade_interval", None),
        (["-u", "http://a"], {"K8SVENT_UPGRADE_INTERVAL": "600"}, "upgrade_interval", 600.0),
        (["-u", "http://a"], {}, "format", "k8svent"),
        (["-u", "http://a", "--format=CloudEvents"], {}, "format", "cloudevents"),
        (
            ["-u", "http://a", "--format=cloudevents"],
            {"K8SVENT_FORMAT": "cloudevents-json"},
            "format",
            "cloudevents",
        ),
        (["-u", "http://a"], {"K8SVENT_FORMAT": "cloudevents-json"}, "format", "cloudevents-json"),
        (["-u", "http://a"], {}, "send", ("new", "changed", "unhealthy", "deleted")),
        (["-u", "http://a", "--send=deleted"], {"K8SVENT_SEND": "new"}, "send", ("deleted",)),
        # in KINDS order, once each, whatever was typed
        (["-u", "http://a"], {"K8SVENT_SEND": " Deleted, new,new,"}, "send", ("new", "deleted")),
        (["-u", "http://a"], {"K8SVENT_SEND": ""}, "send", k8svent.KINDS),
        (["-u", "http://a", "--send=All"], {"K8SVENT_SEND": "new"}, "send", k8svent.KINDS),
    ],
)
def test_settings(argv, environ, field, expected):
    assert getattr(settings(argv, environ), field) == expected


def test_secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    assert settings(["-u", "http://a", f"--secret-file={path}"]).secret == "from-file"
    assert (
        settings(["-u", "http://a"], {"K8SVENT_WEBHOOK_SECRET_FILE": str(path)}).secret
        == "from-file"
    )


@pytest.mark.parametrize(
    "argv, environ, message",
    [
        ([], {}, "no webhook URL"),
        (["-u", "ftp://host/x"], {}, "http:// or https://; this one has the scheme 'ftp'"),
        (["-u", "not a url"], {}, "http:// or https://; this one has no scheme"),
        (["-u", "http//host/x"], {}, "this one has no scheme (a missing '://'?)"),
        (["-u", "htp://host/x"], {}, "this one has another scheme (not shown"),
        (["-u", "http://[::1"], {}, "invalid webhook URL"),
        (["-u", "http://host:abc/"], {}, "invalid webhook URL"),
        (["-u", "http://host:99999/"], {}, "invalid webhook URL"),
        ([], {"K8SVENT_WEBHOOKS": "http://ok, http://[::1"}, "invalid webhook URL"),
        (["-u", "http://exa mple.com/x"], {}, "invalid webhook URL http://exa mple.com:80: "),
        (["-u", "http://a..b/"], {}, "the host is neither a host name nor an IP address"),
        ([], {"K8SVENT_WEBHOOKS": "http://ok, https://x_y.-z/"}, "invalid webhook URL"),
        (["-u", "http://a", "--interval=inf"], {}, "--interval must be a finite number"),
        (["-u", "http://a", "--kubectl-timeout=1e12"], {}, "--kubectl-timeout must be a finite"),
        (["-u", "http://a", "--upgrade-interval=nan"], {}, "--upgrade-interval must be a finite"),
        ([], {"K8SVENT_WEBHOOKS": "file:///etc/passwd"}, "must start with http:// or https://"),
        (["-u", "http://a", "--secret-file=/nonexistent/secret"], {}, "does not exist (make one"),
        (["-u", "http://a", "--secret=/etc/passwd"], {}, "--secret names a file: did you mean"),
        (["-u", "http://a", "-s", "replace-me"], {}, "(--secret) is still the placeholder"),
        (["-u", "http://a"], {"K8SVENT_WEBHOOK_SECRET": "ChangeMe"}, "still the placeholder"),
        (["-u", "http://a", "--secret-file=/"], {}, "cannot read secret file '/'"),
        (["-u", "http://a", "--interval=soon"], {}, "--interval must be a number"),
        (["-u", "http://a", "--interval=-1"], {}, "--interval must be at least 0"),
        (
            ["-u", "http://a"],
            {"K8SVENT_INTERVAL": "2m"},
            "K8SVENT_INTERVAL (--interval) must be a number, not '2m'",
        ),
        (
            ["-u", "http://a"],
            {"K8SVENT_WORKERS": "many"},
            "K8SVENT_WORKERS (--workers) must be a number, not 'many'",
        ),
        (
            ["-u", "http://a"],
            {"K8SVENT_MODE": "stream"},
            "K8SVENT_MODE (--mode) must be watch or poll, not 'stream'",
        ),
        (["-u", "http://a", "--mode=stream"], {}, "--mode must be watch or poll, not 'stream'"),
        (["-u", "http://a", "--resync=-1"], {}, "--resync must be at least 0"),
        (["-u", "http://a", "--retry-interval=-5"], {}, "--retry-interval must be at least"),
        (["-u", "http://a", "--workers=0"], {}, "--workers must be at least 1"),
        (["-u", "http://a", "--chunk-size=1.5"], {}, "--chunk-size must be a number"),
        (
            ["-u", "http://a", "-l", "loud"],
            {},
            "--log-level must be debug, info, warning or error, not 'loud'",
        ),
        (
            ["-u", "http://a"],
            {"K8SVENT_LOG_LEVEL": "trace"},
            "K8SVENT_LOG_LEVEL (--log-level) must be debug, info, warning or error",
        ),
        (["-u", "http://a", "--log-format=xml"], {}, "--log-format must be text or json"),
        (["-u", "http://a", "--listen=8080"], {}, "--listen must be ADDR:PORT"),
        (["-u", "http://a", "--listen=:8080"], {}, "--listen must be ADDR:PORT"),
        (["-u", "http://a", "--listen=0.0.0.0:http"], {}, "--listen must be ADDR:PORT"),
        (["-u", "http://a", "--listen=0.0.0.0:65536"], {}, "--listen must be ADDR:PORT"),
        (["-u", "http://a", "--listen=::1:8080"], {}, "--listen must be ADDR:PORT"),
        (["-u", "http://a", "--listen=[nope]:8080"], {}, "--listen must be ADDR:PORT"),
        (
            ["-u", "http://a"],
            {"K8SVENT_LISTEN": "a b:1"},
            "K8SVENT_LISTEN (--listen) must be ADDR:PORT",
        ),
        (["--bogus"], {}, "unexpected argument --bogus"),
        (["-u", "http://a", "--image=atomist/k8svent:latest"], {}, "without tag or digest"),
        (["-u", "http://a", "--image=Bad Name"], {}, "invalid"),
        (["-u", "http://a", "--upgrade=sometimes"], {}, "--upgrade must be auto, always or never"),
        (["-u", "http://a", "--upgrade-interval=0"], {}, "--upgrade-interval must be at least 1"),
        (["-u", "http://a"], {"K8SVENT_VERSION": "latest"}, "is not a semantic version"),
        (["-u", "http://a", "-s", "whsec_not*base64"], {}, "starts with whsec_ but the rest"),
        (["-u", "http://a"], {"K8SVENT_WEBHOOK_SECRET": "whsec_"}, "is not base64"),
        (
            ["-u", "http://a", "-n", "Shop"],
            {},
            "K8SVENT_NAMESPACE (--namespace) 'Shop' is not a namespace name",
        ),
        (["-u", "http://a"], {"K8SVENT_NAMESPACE": "a" * 64}, "is not a namespace name"),
        (
            ["-u", "http://a", "--exclude-namespace=kube_system"],
            {},
            "K8SVENT_EXCLUDE_NAMESPACES (--exclude-namespace) 'kube_system' is not a namespace",
        ),
        (["-u", "http://a"], {"K8SVENT_EXCLUDE_NAMESPACES": "a,-b"}, "'-b' is not a namespace"),
        (
            ["-u", "http://a", "-n", "shop", "--exclude-namespace=x"],
            {},
            "K8SVENT_EXCLUDE_NAMESPACES (--exclude-namespace) cannot be combined with "
            "K8SVENT_NAMESPACE (--namespace)",
        ),
        (
            ["-u", "http://a"],
            {"K8SVENT_NAMESPACE": "shop", "K8SVENT_EXCLUDE_NAMESPACES": "x"},
            "cannot be combined",
        ),
        (
            ["-u", "http://a", "--selector=app=we b"],
            {},
            "K8SVENT_SELECTOR (--selector) 'app=we b' is not a label selector",
        ),
        (
            ["-u", "http://a", "--format=xml"],
            {},
            "--format must be k8svent, cloudevents or cloudevents-json, not 'xml'",
        ),
        (
            ["-u", "http://a", "--send=new,Gone"],
            {},
            "--send: unknown kind 'Gone'; choose among new, changed, unhealthy, deleted, or all",
        ),
        (["-u", "http://a"], {"K8SVENT_SEND": "updated"}, "K8SVENT_SEND (--send): unknown kind"),
        (["-u", "http://a", "--send= ,"], {}, "--send names no kind"),
    ],
)
def test_bad_input(argv, environ, message):
    with pytest.raises(k8svent.SettingsError, match=re.escape(message)):
        settings(argv, environ)


# Label selectors in Kubernetes' grammar (apimachinery's labels.Parse), and
# the text k8svent sends for them.
@pytest.mark.parametrize(
    "typed, sent",
    [
        ("app=web,tier!=cache", "app=web,tier!=cache"),
        ("env in (prod,staging)", "env in (prod,staging)"),
        ("env notin (a, b),  app", "env notin (a,b),app"),
        ("!canary", "!canary"),
        ("canary", "canary"),
        ("a==b", "a==b"),
        ("a=", "a="),
        ("env in ()", "env in ()"),
        ("example.com/tier=x.y_z-1", "example.com/tier=x.y_z-1"),
        ("replicas>1,replicas<5", "replicas>1,replicas<5"),
        ("k" * 63 + "=" + "v" * 63, "k" * 63 + "=" + "v" * 63),
        ("", ""),
    ],
)
def test_label_selectors(typed, sent):
    assert k8svent.format_label_selector(k8svent.parse_label_selector(typed)) == sent


@pytest.mark.parametrize(
    "typed, message",
    [
        ("app=web,", "expected a label key, found the end"),
        (",app", "expected a label key, found ','"),
        ("app web", "expected an operator after app, found 'web'"),
        ("env in prod", "expected ( after env in"),
        ("env in (prod", "expected , or ) in the values of env"),
        ("env in (a b)", "expected , or ) in the values of env"),
        ("a=b=c", "expected , or the end, found '='"),
        ("!", "expected a label key, found the end"),
        ("in", "expected a label key, found 'in'"),
        ("-app=web", "'-app' is not a label key"),
        ("k" * 64, "is not a label key"),
        ("a/b/c=d", "is not a DNS subdomain"),
        ("Example.com/a", "is not a DNS subdomain"),
        ("/a", "is not a DNS subdomain"),
        ("app=web_", "'web_' is not a label value"),
        ("app=" + "v" * 64, "is not a label value"),
        ("replicas>many", "needs an integer"),
    ],
)
def test_bad_label_selectors(typed, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        k8svent.parse_label_selector(typed)


def test_bad_selector_names_what_was_typed_in_one_line(capsys):
    assert k8svent.main(["-u", "http://a"], {"K8SVENT_SELECTOR": "env in (a b)"}) == 2
    err = capsys.readouterr().err
    assert err == (
        "k8svent: error: K8SVENT_SELECTOR (--selector) 'env in (a b)' is not a "
        "label selector: expected , or ) in the values of env\n"
    )


def test_bad_whsec_secret_is_one_line_without_the_secret(capsys):
    assert k8svent.main(["-u", "http://a", "-s", "whsec_SEKRET*"], {}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("k8svent: error: ")
    assert "SEKRET" not in err


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert k8svent.main(["-u", "https://user:hunter2@host/x", "--interval=no"], {}) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("k8svent: error: ")
    assert "Traceback" not in err


def test_bad_url_error_hides_password_and_path(capsys):
    assert k8svent.main(["-u", "ftp://user:hunter2@host/x?token=SEKRET"], {}) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and "SEKRET" not in err and "'ftp'" in err


def test_settings_repr_hides_secrets():
    shown = repr(
        settings(
            [
                "-u",
                "https://u:hunter2@h/x",
                "-s",
                "topsecret",
                "-u",
                "https://T0K3N@h/hook/PATHTOKEN?q=QUERYTOKEN",
            ]
        )
    )
    for secret in ("hunter2", "topsecret", "T0K3N", "u:", "PATHTOKEN", "QUERYTOKEN"):
        assert secret not in shown
    assert "https://***@h:443" in shown


@pytest.mark.parametrize(
    "url",
    [
        "T0K3N:x@host/PATHTOKEN",  # a user name taken for a scheme
        "https://T0K3N:x@host:abc/PATHTOKEN?q=QUERYTOKEN",  # a bad port
        "https://T0K3N@[::1/PATHTOKEN",
        "ftp://T0K3N@host/PATHTOKEN?q=QUERYTOKEN",
    ],
)
def test_bad_url_errors_name_no_part_of_it(url):
    with pytest.raises(k8svent.SettingsError) as caught:
        settings(["-u", url])
    assert "T0K3N" not in str(caught.value) and "QUERYTOKEN" not in str(caught.value)
    assert "PATHTOKEN" not in str(caught.value)


def test_help_is_the_readme_usage(capsys):
    assert k8svent.main(["--help"], {}) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == k8svent.__doc__.strip()
    readme = README.read_text()
    block = re.search(r"<!-- usage -->\n```\n(.*?)```", readme, re.S)
    assert block, "README has no usage block"
    assert block.group(1).strip() == printed


def test_version(capsys, monkeypatch):
    monkeypatch.delenv("K8SVENT_VERSION", raising=False)
    assert k8svent.main(["--version"], {}) == 0
    assert capsys.readouterr().out.strip() == k8svent.version()
    monkeypatch.setenv("K8SVENT_VERSION", "9.9.9")
    k8svent.main(["--version"], {})
    assert capsys.readouterr().out.strip() == "9.9.9"

"""gunicorn settings for shlhost (``shlhost serve`` passes this file with ``-c``).

Every value can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

workers = int(os.environ.get("SHLHOST_WORKERS", min(4, multiprocessing.cpu_count() * 2)))
# gthread, except that keep-alive connections are spread over the workers (see the module).
worker_class = "shlhost.gunicorn_worker.FairThreadWorker"
threads = int(os.environ.get("SHLHOST_THREADS", 4))
timeout = 120
graceful_timeout = 30
keepalive = 5
# Each worker builds its own app and database pool after the fork.
preload_app = False
# No gunicorn access log: the app logs every request itself (shlhost/logs.py), with its
# request id, by URL rule rather than raw path (no link ids, no tickets), as text or JSON.
accesslog = None
errorlog = "-"
# Large uploads: bodies are bounded by SHLHOST_MAX_CONTENT_LENGTH, not here.
limit_request_line = 8190
forwarded_allow_ips = os.environ.get("SHLHOST_FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn >= 27 opens a control socket at one fixed path per user; several servers on one
# machine (tests, benches, blue/green) would fight over it, and shlhost does not use it.
control_socket_disable = True

# Prometheus: every worker writes its metrics to files in one directory and /metrics adds
# them up. The variable must be set before a worker imports prometheus_client; a fresh
# directory per server unless the operator chose one (then it is emptied at start-up).
_METRICS_DIR_OWNED = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _METRICS_DIR_OWNED:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="shlhost-metrics-")



def _log_format() -> str:
    """The app's LOG_FORMAT (file, environment, default by ENV), read the way the app reads it."""
    try:
        from flask import Config, Flask

        from shlhost import config as shlhost_config
        from shlhost.logs import log_format

        explicit = os.environ.get("SHLHOST_INSTANCE_PATH")
        instance = os.path.abspath(explicit) if explicit else Flask("shlhost").instance_path
        cfg = Config(instance)
        shlhost_config.load(cfg, instance, None)
        return log_format(cfg)
    except Exception:  # noqa: BLE001 - a broken config fails loudly in the workers instead
        return "text"


# gunicorn's own lines (start, workers booting and exiting) in the app's format, so that a
# JSON deployment writes nothing but JSON objects.
if _log_format() == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "shlhost.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stderr"}},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        },
        # Libraries' warnings too; the app's own logger does not propagate here in JSON mode.
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    }


def on_starting(server: Any) -> None:
    if not _METRICS_DIR_OWNED:
        folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()


def post_worker_init(worker: Any) -> None:
    # gunicorn says when it forks a worker; this says when the worker has loaded the app
    # and starts accepting (benchmarks wait for every worker; operators see slow boots).
    worker.log.info("Worker ready (pid: %s)", worker.pid)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    if _METRICS_DIR_OWNED:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


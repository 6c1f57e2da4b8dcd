"""gunicorn settings for shlhost (``shlhost serve`` passes this file with ``-c``).

Every value can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import multiprocessing
import os

workers = int(os.environ.get("SHLHOST_WORKERS", min(4, multiprocessing.cpu_count() * 2)))
worker_class = "gthread"
threads = int(os.environ.get("SHLHOST_THREADS", 4))
timeout = 120
graceful_timeout = 30
keepalive = 5
# Each worker builds its own app and database pool after the fork.
preload_app = False
accesslog = "-"
# Path only (%(U)s): query strings carry location tickets and must not reach the log.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
errorlog = "-"
# Large uploads: bodies are bounded by SHLHOST_MAX_CONTENT_LENGTH, not here.
limit_request_line = 8190
forwarded_allow_ips = os.environ.get("SHLHOST_FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn >= 27 opens a control socket at one fixed path per user; several servers on one
# machine (tests, benches, blue/green) would fight over it, and shlhost does not use it.
control_socket_disable = True

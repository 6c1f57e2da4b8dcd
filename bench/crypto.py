"""JWE encryption and decryption of large files, beside raw AES-256-GCM over the same bytes.

    .venv/bin/python bench/crypto.py [--sizes 1,10,100] [--repeat 3] [--json]

For each size (MiB) a file of random bytes is made once; then each phase runs in a process
of its own, so that its peak memory (ru_maxrss, less the process's size before the work)
is its own:

- raw encrypt / raw decrypt: ``AESGCM.encrypt``/``decrypt`` of the whole payload held in
  memory (the plaintext read before the clock starts): the floor;
- raw encrypt, file to file: the same, with reading the plaintext file and writing the
  sealed bytes to a file inside the clock (the I/O the server's path also does), for
  reference;
- shlhost encrypt: ``jwe.encrypt_stream`` from the plaintext file to a token file, as the
  server does from an upload's spool to the blob store (the clock includes the reading and
  writing, and base64url);
- shlhost decrypt: ``jwe.decrypt_stream`` from the token file to a plaintext file;
- jwcrypto encrypt (reference): jwcrypto's compact JWE of the payload in memory, the
  starting point of issue 9.

Times are the best of ``--repeat`` runs. Targets (issue 9): shlhost at most 2x the raw time,
peak memory at most 2.5x the payload. Exit status 0 when both targets hold for every size.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
TIME_TARGET = 2.0
MEMORY_TARGET = 2.5
PHASES = ("raw-encrypt", "raw-encrypt-file", "shlhost-encrypt", "raw-decrypt", "shlhost-decrypt",
          "jwcrypto-encrypt")
CTY = "application/fhir+json"


def status(field: str) -> int:
    """VmRSS or VmHWM of this process, bytes. VmHWM starts afresh at exec, unlike ru_maxrss,
    which a child inherits from its parent (the parent has held a payload)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(phase: str, folder: Path, repeat: int) -> dict[str, Any]:
    """Run one phase ``repeat`` times in this process; report the best time and peak memory."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from shlhost.crypto import jwe
    from shlhost.crypto.b64 import b64url_decode, b64url_encode

    key = bytes.fromhex((folder / "key").read_text())
    plain, token = folder / "plain", folder / "token"
    payload = plain.read_bytes() if phase in ("raw-encrypt", "jwcrypto-encrypt") else None
    sealed = None
    protected = jwe.protected_header(CTY).encode("ascii")
    if phase == "raw-decrypt":
        parts = token.read_text().split(".")
        iv, sealed = b64url_decode(parts[2]), b64url_decode(parts[3]) + b64url_decode(parts[4])
        protected = parts[0].encode("ascii")
    base = status("VmRSS")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        if phase == "raw-encrypt":
            assert payload is not None
            out = AESGCM(key).encrypt(os.urandom(12), payload, protected)
        elif phase == "raw-encrypt-file":
            sealed_file = AESGCM(key).encrypt(os.urandom(12), plain.read_bytes(), protected)
            (folder / "raw-sealed").write_bytes(sealed_file)
            out = None
            del sealed_file
        elif phase == "raw-decrypt":
            assert sealed is not None
            out = AESGCM(key).decrypt(iv, sealed, protected)
        elif phase == "shlhost-encrypt":
            with plain.open("rb") as src, token.open("wb") as dst:
                jwe.encrypt_stream(src, dst, key, CTY)
            out = None
        elif phase == "shlhost-decrypt":
            with token.open("rb") as src, (folder / "back").open("wb") as dst:
                jwe.decrypt_stream(src, dst, key)
            out = None
        else:
            from jwcrypto import jwe as jwcrypto_jwe
            from jwcrypto import jwk

            obj = jwcrypto_jwe.JWE(payload, protected={"alg": "dir", "enc": "A256GCM", "cty": CTY})
            obj.add_recipient(jwk.JWK(kty="oct", k=b64url_encode(key)))
            out = obj.serialize(compact=True)
        times.append(time.perf_counter() - start)
        del out
    peak = status("VmHWM") - base
    return {"phase": phase, "first": times[0], "seconds": min(times), "peak_bytes": max(peak, 0)}


def run_phase(phase: str, folder: Path, repeat: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", phase, "--folder", str(folder), "--repeat", str(repeat)],
        check=True, capture_output=True, text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def measure(size_mib: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="shlhost-bench-crypto-") as tmp:
        folder = Path(tmp)
        with (folder / "plain").open("wb") as fh:
            for _ in range(size_mib):
                fh.write(os.urandom(MiB))
        (folder / "key").write_text(os.urandom(32).hex())
        results = {}
        for phase in PHASES:  # shlhost-encrypt makes the token the decrypt phases read
            results[phase] = run_phase(phase, folder, repeat)
        if not filecmp.cmp(folder / "back", folder / "plain", shallow=False):
            raise SystemExit("shlhost's decryption did not give the plaintext back")
    return {"mib": size_mib, **{p: results[p] for p in PHASES}}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """One line per size and run (the first run of a fresh process; the best of the runs)."""
    lines = [
        "| payload | run | raw enc ms | shlhost enc ms | ratio | raw dec ms | shlhost dec ms | ratio "
        "| raw enc file to file ms | jwcrypto enc ms |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    memory = [
        "| payload | raw enc | shlhost enc | shlhost dec | shlhost worst / payload | jwcrypto enc |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    ok = True
    for row in rows:
        for run, label in (("first", "first"), ("seconds", "best")):
            enc = row["shlhost-encrypt"][run] / row["raw-encrypt"][run]
            dec = row["shlhost-decrypt"][run] / row["raw-decrypt"][run]
            ok = ok and enc <= TIME_TARGET and dec <= TIME_TARGET
            lines.append(
                f"| {row['mib']} MiB | {label} | {ms(row['raw-encrypt'][run])} "
                f"| {ms(row['shlhost-encrypt'][run])} | {enc:.2f} | {ms(row['raw-decrypt'][run])} "
                f"| {ms(row['shlhost-decrypt'][run])} | {dec:.2f} | {ms(row['raw-encrypt-file'][run])} "
                f"| {ms(row['jwcrypto-encrypt'][run])} |"
            )
        peaks = {p: row[p]["peak_bytes"] / MiB for p in PHASES}
        worst = max(peaks["shlhost-encrypt"], peaks["shlhost-decrypt"]) / row["mib"]
        ok = ok and worst <= MEMORY_TARGET
        memory.append(
            f"| {row['mib']} MiB | {peaks['raw-encrypt']:.1f} MiB | {peaks['shlhost-encrypt']:.1f} MiB "
            f"| {peaks['shlhost-decrypt']:.1f} MiB | {worst:.2f} | {peaks['jwcrypto-encrypt']:.0f} MiB |"
        )
    return "\n".join([*lines, "", "Peak memory above the process's size before the work:", "", *memory]), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,100", help="payload sizes in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder), args.repeat)))
        return
    rows = [measure(int(size), args.repeat) for size in args.sizes.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
    text, ok = table(rows)
    print(f"bench/crypto.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, best of {args.repeat}")
    print(text)
    print(f"targets: shlhost time <= {TIME_TARGET}x raw AES-256-GCM, peak memory <= {MEMORY_TARGET}x "
          f"the payload: {'met' if ok else 'NOT met'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

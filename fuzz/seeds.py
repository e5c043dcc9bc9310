#!/usr/bin/env python3
"""Writes the starting seeds of every fuzz target into DIR/<target>/ (default fuzz/seeds).

Sources: the GATT vectors (gateway/tests/vectors/gatt.json, a copy of the shared vector set), the gateway's
config.example.toml, ingest's documented configuration (ingest/src/config.rs module doc), the payload
examples in docs/asyncapi.yaml and the CRM configuration messages the end-to-end tests publish. The
committed corpora under fuzz/seeds/ are these seeds plus what the campaign found, minimised
(`fuzz/run.sh cmin`, libFuzzer `-merge=1` as `cargo fuzz cmin` runs it); this script is how a corpus can be rebuilt from scratch. Inputs naming a file the
configuration parsers would read (password_file, rules_file, ca, …) are left out: the targets skip them.
"""
import hashlib
import json
import os
import re
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "fuzz", "seeds")

# GATT characteristic (as named in the vector file) -> fuzz target.
GATT_TARGETS = {
    "SFLOAT": "sfloat_float",
    "FLOAT": "sfloat_float",
    "2A18": "glucose_measurement",
    "2A34": "glucose_context",
    "2A51": "glucose_feature",
    "2A52": "racp",
    "2A35": "blood_pressure_measurement",
    "2A36": "intermediate_cuff_pressure",
    "2A49": "blood_pressure_feature",
    "2A08": "date_time",
    "2A2B": "current_time",
    "2A19": "battery_level",
    "2A23": "system_id",
    "2A24": "model_number",
}
# Characteristics without vectors: one plausible value each (Bluetooth BAS / DIS).
EXTRA = {
    "battery_level": [b"\x64", b"\x00", b"\xff"],
    "system_id": [bytes.fromhex("0011220000334455")],
    "model_number": [b"Contour7830", b"BP7250", "Uri\u00e4".encode()],
}


def write(target, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def drop_file_keys(toml_text, keys):
    """Comments out the lines setting a key that names a file, and a [mqtt.tls] table."""
    out, skip = [], False
    for line in toml_text.splitlines():
        s = line.strip()
        if s.startswith("["):
            skip = s in ("[mqtt.tls]",)
        key = s.split("=", 1)[0].strip() if "=" in s and not s.startswith("#") else None
        if skip or key in keys:
            out.append("# " + line)
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def main():
    vectors = json.load(open(os.path.join(ROOT, "gateway", "tests", "vectors", "gatt.json")))
    for v in vectors:
        target = GATT_TARGETS.get(v["characteristic"])
        if target:
            write(target, bytes.fromhex(v["hex"]))
    for target, values in EXTRA.items():
        for value in values:
            write(target, value)

    # Gateway configuration: the documented example, and the smallest valid one.
    example = open(os.path.join(ROOT, "gateway", "config.example.toml")).read()
    gw_keys = {"password_file", "rules_file"}
    write("config_gateway", drop_file_keys(example, gw_keys).encode())
    write("config_gateway", b'gateway_id = "gw-0001"\n[mqtt]\nbroker = "mqtt://127.0.0.1:1883"\n'
          b'[journal]\ndir = "j"\n[[bindings]]\ndevice = "00:11:22:33:44:55"\npatient = "p-0001"\n')

    # Ingest configuration: the module doc's example (the `//!` toml block), and an empty file.
    src = open(os.path.join(ROOT, "ingest", "src", "config.rs")).read()
    block = re.search(r"//! ```toml\n(.*?)//! ```", src, re.S).group(1)
    doc = "\n".join(l[4:] if l.startswith("//! ") else l[3:] for l in block.splitlines())
    ingest_keys = {"ca_file", "ca", "client_cert", "client_key", "file", "secret_file", "token_file"}
    write("config_ingest", drop_file_keys(doc, ingest_keys).encode())
    write("config_ingest", b"")
    write("config_ingest", b'[database]\nurl = "postgres://ingest@127.0.0.1/phg"\n'
          b'[api]\nlisten = "127.0.0.1:8480"\ntoken = "0123456789abcdef0123"\n')

    # Payloads: every example in the AsyncAPI document, on the target that parses its kind.
    api = yaml.safe_load(open(os.path.join(ROOT, "docs", "asyncapi.yaml")))
    for name, msg in api["components"]["messages"].items():
        for ex in msg.get("examples", []):
            payload = json.dumps(ex["payload"], separators=(",", ":")).encode()
            if name in ("reading", "event"):
                write("ingest_payload", payload)
            elif name == "config":
                write("crm_config", payload)

    # CRM configuration messages as tests/tests/gateway_e2e.rs publishes them.
    tightened = {"patient": "p-bp-a1", "overrides": [{"rule_id": "BP_GRADE2", "param": "sbp",
                 "mmhg": "60", "set_by": "dr-test", "reason": "end-to-end test"}]}
    relaxed = {"patient": "p-bp-a1", "profile": "CN", "insulin_treated": True, "overrides": [
        {"rule_id": "GLU_HYPO_L2", "param": "value", "mg_dl": "45", "set_by": "dr-test",
         "reason": "r", "waiver": "w", "effective_from_utc": 1718000000}]}
    for version, patients in ((1, [tightened]), (2, [relaxed]), (3, [])):
        write("crm_config", json.dumps({
            "schema": "phg.config/1", "version": version,
            "bindings": [{"device": "cuff-a", "patient": "p-bp-a1"},
                         {"device": "A4:C1:38:0B:5E:21", "user_id": 2, "patient": "p-bp-b2"}],
            "patients": patients}, separators=(",", ":")).encode())

    # Kiosk card-reader link frames: the known-answer frames of protocol/src/link.rs's module doc, each
    # alone, all in one stream, and behind line noise (the decoder must resynchronise at the delimiter).
    frames = {
        "hello": "00010201020109F8ACD19101017 4E100".replace(" ", ""),
        "card4": "000A0502040 4A22B1A56E900".replace(" ", ""),
        "ack": "00020503FF7100",
        "show": "00060201012 57B00".replace(" ", ""),
        "ping": "000503023D0600",
    }
    for hexed in frames.values():
        write("link_frame", bytes.fromhex(hexed))
    write("link_frame", b"".join(bytes.fromhex(h) for h in frames.values()))
    write("link_frame", b"\x137garbage" + bytes.fromhex(frames["card4"]))


if __name__ == "__main__":
    main()

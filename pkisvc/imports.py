"""Certificate sets brought in from outside: the seed's file names, from a directory or a pillar.

Reading and parsing only; the store writes an imported set as a new generation.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from pkisvc import pki
from pkisvc.errors import InvalidMaterial, InvalidRequest
from pkisvc.model import CERT_FILES, KEY_FILES, TRUST_FILE
from pkisvc.settings import one_line

IMPORT_FILES = ("ca.crt", "ca.key", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key")


def check_import(files: Mapping[str, bytes]) -> pki.CertSet:
    """Parse an imported set after checking its file names (ca.key is optional).

    Raises: InvalidMaterial naming the file at fault.
    """
    unknown = sorted(set(files) - set(IMPORT_FILES))
    if unknown:
        raise InvalidMaterial(f"{unknown[0]}: not one of {', '.join(IMPORT_FILES)}")
    missing = [n for n in IMPORT_FILES if n != "ca.key" and n not in files]
    if missing:
        raise InvalidMaterial(f"{missing[0]}: missing")
    return parse_import(files)


def parse_import(files: Mapping[str, bytes]) -> pki.CertSet:
    """Parse an imported set; ca.crt may be a bundle: its issuer of server.cert signs."""
    bundle = pki.load_certs(files["ca.crt"], "ca.crt")
    server = pki.load_cert(files["server.cert"], "server.cert")
    # CAs of one cluster share a name (old and new during a rotation): the signer is the one
    # whose key signed server.cert; failing that, check_set names what is wrong.
    signer = pki.issuer_among(server, bundle) or next(
        (c for c in bundle if c.subject == server.issuer), bundle[0])
    ca_key = files.get("ca.key")
    return pki.CertSet(
        ca=signer,
        ca_key=pki.load_key(ca_key, "ca.key") if ca_key is not None else None,
        server=server, server_key=pki.load_key(files["server.key"], "server.key"),
        kubecfg=pki.load_cert(files["kubecfg.crt"], "kubecfg.crt"),
        kubecfg_key=pki.load_key(files["kubecfg.key"], "kubecfg.key"),
        trust=tuple(bundle))


_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def kept_bytes(certs: pki.CertSet, files: Mapping[str, bytes]) -> dict[str, tuple[Any, bytes]]:
    """The imported files to store byte for byte (changes.Draft.verbatim): hosts then receive
    exactly what they hold (easy-rsa writes a text dump before each PEM).  Only a file whose
    PEM blocks are all of its own kind is kept (a key pasted into ca.crt would reach every
    node); any other is stored re-encoded."""
    certificate = ("CERTIFICATE",)
    key = ("PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY")
    wanted: list[tuple[str, str, Any, tuple[str, ...]]] = [
        ("ca.crt", TRUST_FILE, certs.trust, certificate),
        ("server.cert", CERT_FILES["server"], certs.server, certificate),
        ("server.key", KEY_FILES["server"], certs.server_key, key),
        ("kubecfg.crt", CERT_FILES["kubecfg"], certs.kubecfg, certificate),
        ("kubecfg.key", KEY_FILES["kubecfg"], certs.kubecfg_key, key),
        ("ca.key", KEY_FILES["ca"], certs.ca_key, key)]
    if len(certs.trust) == 1:
        wanted.append(("ca.crt", CERT_FILES["ca"], certs.ca, certificate))
    kept = {}
    for source, stored, value, kinds in wanted:
        data = files.get(source)
        blocks = _PEM_BEGIN.findall(data) if data is not None else []
        if value is not None and data is not None and blocks and all(
                b.decode() in kinds for b in blocks) and (kinds == certificate or len(blocks) == 1):
            kept[stored] = (value, data)
    return kept


def read_import_dir(path: str | Path) -> dict[str, bytes]:
    """Read the seed's file names from a directory (ca.key is optional)."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidRequest(f"{root}: not a directory")
    out = {}
    for name in IMPORT_FILES:
        f = root / name
        if f.is_file():
            try:
                out[name] = f.read_bytes()
            except OSError as e:
                raise InvalidMaterial(f"{f}: {e.strerror}") from None
    return out


def read_import_pillar(path: str | Path, key: str) -> dict[str, bytes]:
    """Read a pasted-pillar YAML file; key (`a:b`) names the mapping of file names to PEM."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise InvalidRequest(f"{path}: {e.strerror}") from None
    except yaml.YAMLError:
        raise InvalidRequest(f"{path}: not valid YAML") from None
    node: Any = doc
    for part in key.split(":"):
        if not isinstance(node, Mapping) or part not in node:
            raise InvalidRequest(f"{path}: no key {key!r} (missing {part!r})")
        node = node[part]
    if not isinstance(node, Mapping):
        raise InvalidRequest(f"{path}: {key!r} is not a mapping of file names to PEM")
    aliases = {n.replace(".", "_"): n for n in IMPORT_FILES}
    out: dict[str, bytes] = {}
    for name, value in node.items():
        fname = aliases.get(str(name), str(name))
        where = one_line(f"{key}:{name}")
        if fname not in IMPORT_FILES:
            raise InvalidMaterial(f"{where}: not one of {', '.join(IMPORT_FILES)}")
        if not isinstance(value, str):
            raise InvalidMaterial(f"{where}: not a PEM text")
        out[fname] = value.encode()
    return out

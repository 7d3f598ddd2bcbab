"""Check recorded RPC exchanges (``daemon.rpc_record``) against the API document.

Every request and its answer must be what the document says: a method it
names, params its schema accepts (and, for a -32602 answer, params it
refuses: the document is as strict as the daemon), a result its schema
accepts, an application error it lists for that method, and event
notifications as ``x-notifications`` describes them. An internal error
(-32603) is always a finding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from blockbackupd.rpc import api

#: Protocol errors that say the request itself was not one (no method to check).
_MALFORMED = {-32700, -32600}


class Checker:
    def __init__(self, document: dict[str, Any] | None = None) -> None:
        self.doc = document or api.document()
        components = self.doc["components"]
        self._methods = {m["name"]: m for m in self.doc["methods"]}
        self._errors = {name: {e["$ref"].rsplit("/", 1)[1] for e in m["errors"]}
                        for name, m in self._methods.items()}
        self._codes = {kind: e["code"] for kind, e in components["errors"].items()}

        def validator(schema: dict[str, Any]) -> Draft202012Validator:
            # The document is the root, so "#/components/schemas/X" resolves.
            return Draft202012Validator({**schema, "components": components})

        self._params = {}
        self._results = {}
        for name, m in self._methods.items():
            self._params[name] = validator({
                "type": "object", "additionalProperties": False,
                "properties": {p["name"]: p["schema"] for p in m["params"]},
                "required": [p["name"] for p in m["params"] if p["required"]]})
            self._results[name] = validator(m["result"]["schema"])
        self._event = validator(self.doc["x-notifications"][0]["params"])
        #: Methods seen with a successful answer.
        self.answered: set[str] = set()

    def findings(self, entries: Iterable[dict[str, Any]]) -> Iterator[str]:
        for entry in entries:
            if "notification" in entry:
                yield from self._notification(entry["notification"])
                continue
            request, reply = entry.get("request"), entry.get("reply")
            if isinstance(request, list):  # a batch: answers matched by id
                replies = {r.get("id"): r for r in reply or [] if isinstance(r, dict)}
                for r in request:
                    if isinstance(r, dict):
                        yield from self._exchange(r, replies.get(r.get("id")))
            elif isinstance(request, dict):
                yield from self._exchange(request, reply if isinstance(reply, dict) else None)

    def _notification(self, note: Any) -> Iterator[str]:
        if not isinstance(note, dict) or note.get("method") != "event":
            yield f"notification that is not an event: {_short(note)}"
            return
        for err in self._event.iter_errors(note.get("params")):
            yield f"event {_short(note.get('params'))}: {err.message} at {_path(err)}"

    def _exchange(self, request: dict[str, Any], reply: dict[str, Any] | None) -> Iterator[str]:
        method = request.get("method")
        if reply is None:
            return  # a notification from the client: nothing answered
        error = reply.get("error")
        if isinstance(error, dict) and error.get("code") in _MALFORMED:
            return
        if method not in self._methods:
            if not (isinstance(error, dict) and error.get("code") == -32601):
                yield f"{method!r}: not in the document, yet answered {_short(reply)}"
            return
        params = request.get("params", {})
        if params == []:
            params = {}  # no params at all, which the daemon takes as such
        bad_params = [f"{e.message} at {_path(e)}"
                      for e in self._params[method].iter_errors(params)]
        if error is None:
            self.answered.add(method)
            for message in bad_params:
                yield f"{method}: the daemon accepted params the document refuses: {message}"
            for err in self._results[method].iter_errors(reply.get("result")):
                yield (f"{method}: result {_short(reply.get('result'))}: {err.message} "
                       f"at {_path(err)}")
            return
        code = error.get("code")
        if code == -32602:
            if not bad_params and isinstance(params, dict):
                yield (f"{method}: the daemon refused params the document accepts "
                       f"({error.get('message')}): {_short(params)}")
            return
        if code == -32603:
            yield f"{method}: internal error {error.get('message')!r} for {_short(params)}"
            return
        kind = (error.get("data") or {}).get("kind")
        if kind not in self._errors[method]:
            yield (f"{method}: answered {kind} ({code}), which the document does not list: "
                   f"{error.get('message')!r}")
        elif self._codes[kind] != code:
            yield f"{method}: {kind} came with code {code}, not {self._codes[kind]}"
        if kind != "permission-denied":  # refused before its params were read
            for message in bad_params:
                yield f"{method}: the daemon took params the document refuses: {message}"


def _path(err: Any) -> str:
    return "/".join(str(p) for p in err.absolute_path) or "the top"


def _short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def check_directory(directory: Path) -> tuple[Checker, list[str], int]:
    """(the checker, its findings, the number of entries) for every record file."""
    checker = Checker()
    entries = list(read(sorted(directory.glob("*.jsonl"))))
    return checker, list(dict.fromkeys(checker.findings(entries))), len(entries)

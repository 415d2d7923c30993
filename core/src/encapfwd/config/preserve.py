"""Keeping comments: the new configuration applied to the existing document (``tomlkit``) as a minimal
change, so that a hand-written file keeps its comments and layout."""

from __future__ import annotations

from typing import Optional, Tuple

import attrs
import tomlkit
from tomlkit.container import Container
from tomlkit.items import AoT, Array, InlineTable, Null, Table, Whitespace

from encapfwd.config.toml import (
    _advisor_toml,
    _cluster_dict,
    _inline,
    _plain,
    _port_dict,
    _server_dict,
    _table,
    dumps,
    loads,
)
from encapfwd.errors import ConfigError
from encapfwd.model import Advisor, Cluster, Config, Port, Server


class _Unmergeable(Exception):
    """The existing document has a shape the minimal change does not handle: write a fresh one."""


def render(new: Config, old: Optional[Config] = None, old_text: Optional[str] = None) -> str:
    """The text to save for *new*: *old_text* (which loads as *old*) changed as little as possible, so its
    comments and layout stay; a fresh document when there is none or when that fails."""
    if old is None or old_text is None:
        return dumps(new)
    try:
        doc = tomlkit.parse(old_text)
        _attach_comments(doc, old_text)
        _merge_document(doc, old, new)
        text = doc.as_string()
    except Exception:  # a tomlkit surprise costs the comments, never the edit
        return dumps(new)
    crlf = "\r\n" in old_text and old_text.count("\r\n") == old_text.count("\n")
    if crlf:
        text, old_text = text.replace("\r\n", "\n"), old_text.replace("\r\n", "\n")
    if text.endswith("\n\n") and not old_text.endswith("\n\n"):
        text = text.rstrip("\n") + "\n"  # what followed a removed table: no blank lines at the end
    if crlf:
        text = text.replace("\n", "\r\n")  # the file's line endings, for the new lines too
    try:
        if loads(text) == new:
            return text
    except ConfigError:
        pass
    return dumps(new)


def _run(container: Container, end: int) -> Tuple[int, int]:
    """The run of comment/whitespace items that ends at *end* in *container*."""
    body = container.body
    start = end
    while start > 0 and body[start - 1][0] is None:
        start -= 1
    return start, end


def _entry_container(item) -> Optional[Container]:
    if isinstance(item, Table):
        return item.value
    if isinstance(item, AoT) and item.body:
        return item.body[-1].value
    return None


def _tail(container: Container) -> Tuple[Container, int, int]:
    """Where the text at the very end of *container* (in document order, sub-tables included) lives."""
    body = container.body
    start, end = _run(container, len(body))
    if start == end and body:
        inner = _entry_container(body[-1][1])
        if inner is not None:
            return _tail(inner)
    return container, start, end


def _run_text(container: Container, start: int, end: int) -> str:
    return "".join(item.as_string() for _, item in container.body[start:end])


def _set_run(container: Container, start: int, end: int, text: str) -> None:
    """Replace the comment/whitespace items ``body[start:end]`` by *text* (indices of keys do not move)."""
    body = container.body
    for i in range(start, end):
        body[i] = (None, Null())
    if not text:
        return
    if start < end:
        body[start] = (None, Whitespace(text))
        return
    body.insert(start, (None, Whitespace(text)))
    for key, index in list(container._map.items()):  # tomlkit has no public insert for trivia
        if isinstance(index, tuple):
            container._map[key] = tuple(i + 1 if i >= start else i for i in index)
        elif index >= start:
            container._map[key] = index + 1


def _split_attached(text: str) -> Tuple[str, str]:
    """(kept, attached): *attached* is the block of comment lines right above a header (no blank line in
    between); it belongs to that header's object."""
    lines = text.splitlines(keepends=True)
    cut = len(lines)
    while cut > 0 and lines[cut - 1].lstrip().startswith("#"):
        cut -= 1
    return "".join(lines[:cut]), "".join(lines[cut:])


def _attach(location: Tuple[Container, int, int], table: Table) -> None:
    container, start, end = location
    kept, attached = _split_attached(_run_text(container, start, end))
    if attached:
        _set_run(container, start, end, kept)
        table.trivia.indent = attached + table.trivia.indent


def _before(container: Container, index: int) -> Tuple[Container, int, int]:
    """Where the text right before the item ``body[index]`` of *container* lives (the end of the previous
    table, when that is a table)."""
    start, end = _run(container, index)
    if start == end and start > 0:
        inner = _entry_container(container.body[start - 1][1])
        if inner is not None:
            return _tail(inner)
    return container, start, end


def _attach_comments(doc, text: str) -> None:
    """Move the comments right above each ``[table]``/``[[table]]`` header into that table (they are kept
    at the end of the previous table by the parser), so that they go with it when it is removed and stay
    with it when something is added before it. The document renders exactly as before."""

    def walk(container: Container) -> None:
        body = container.body
        for index, (key, item) in enumerate(list(body)):
            if key is None:
                continue
            if isinstance(item, Table):
                if not item.is_super_table():
                    _attach(_before(container, index), item)
                walk(item.value)
            elif isinstance(item, AoT):
                for n, entry in enumerate(item.body):
                    location = _before(container, index) if n == 0 else _tail(item.body[n - 1].value)
                    _attach(location, entry)
                    walk(entry.value)

    walk(doc)
    # what follows the last table (end-of-file comments) belongs to the document, not to that table
    container, start, end = _tail(doc)
    if container is not doc:
        trailing = _run_text(container, start, end)
        _set_run(container, start, end, "")
        _set_run(doc, len(doc.body), len(doc.body), trailing)
    if doc.as_string() != text:
        raise _Unmergeable("moving comments changed the document")


def _container(holder) -> Optional[Container]:
    if isinstance(holder, Table):
        return holder.value
    if isinstance(holder, Container):
        return holder
    return None  # an inline table


def _add_key(holder, key: str, value) -> None:
    """Add *key* after the last key/value of *holder* (before its comments and sub-tables; a table goes
    before the first sub-table), with a blank line above a table it ends up in front of.

    Works on the container, not through ``Table.__setitem__``, which guesses an indentation from the text
    above the table's header (where the comments that belong to the table are kept).
    """
    container = _container(holder)
    if container is None:
        holder[key] = value
        return
    body = container.body
    pairs = [i for i, (k, v) in enumerate(body) if k is not None and not isinstance(v, (Table, AoT))]
    tables = [i for i, (k, v) in enumerate(body) if k is not None and isinstance(v, (Table, AoT))]
    if pairs and not isinstance(value, (Table, AoT)):
        index = pairs[-1] + 1
    elif tables:
        index = tables[0]
    else:
        index = len(body) if holder is container else 0
    if index >= len(body):
        container.append(key, value)
    else:
        container._insert_at(index, key, value)  # tomlkit's positional insert
        following = body[index + 1][1]
        if isinstance(following, AoT) and following.body:
            following = following.body[0]
        if isinstance(following, Table) and not following.trivia.indent.startswith(("\n", "\r\n")):
            following.trivia.indent = "\n" + following.trivia.indent
    if isinstance(holder, Table):
        dict.__setitem__(holder, key, container[key])


def _merge_fields(table, old, new, skip=()) -> None:
    for a in attrs.fields(type(new)):
        if a.name in skip:
            continue
        before, after = getattr(old, a.name), getattr(new, a.name)
        if before == after:
            continue  # whatever the file says, it means this: leave it as written
        if after is None:
            if a.name in table:
                del table[a.name]
        elif a.name in table:
            table[a.name] = _plain(after)
        else:
            _add_key(table, a.name, _plain(after))


def _ends_with_blank_line(container: Container) -> bool:
    lines = _run_text(*_tail(container)).splitlines()
    return bool(lines) and not lines[-1].strip()


def _join(first: str, second: str) -> str:
    """*first* then *second*, without doubling the blank line where they meet."""
    first_lines, second_lines = first.splitlines(keepends=True), second.splitlines(keepends=True)
    if first_lines and not first_lines[-1].strip() and second_lines and not second_lines[0].strip():
        second_lines = second_lines[1:]
    return first + "".join(second_lines)


def _space_out(table: Table) -> None:
    """Give every ``[[table]]`` inside a new *table* a blank line above it, like the rest of the file."""
    for _, item in table.value.body:
        if isinstance(item, AoT):
            for entry in item.body:
                if "\n" not in entry.trivia.indent:
                    entry.trivia.indent = "\n" + entry.trivia.indent
                _space_out(entry)


def _remove_entry(holder, key: str, entries, index: int) -> None:
    """Remove ``entries[index]``; the text after it (which belongs to what follows) takes the place of the
    text before it."""
    if isinstance(entries, AoT):
        if index > 0:
            location = _tail(entries.body[index - 1].value)
        else:
            container = holder.value if isinstance(holder, Table) else holder
            where = container._map.get(tomlkit.key(key))
            location = _before(container, where) if isinstance(where, int) else None
        if location is not None:
            following = _tail(entries.body[index].value)
            text = _join(_run_text(*location), _run_text(*following))
            _set_run(*following, "")
            _set_run(*location, text)
    del entries[index]


def _merge_list(holder, key: str, old_items, new_items, ident, merge_one, as_dict) -> None:
    """Change the array *key* of *holder* (whose entries load as *old_items*) into *new_items*: entries that
    stay are merged in place, removed ones go (with the comments above them), new ones are appended."""
    if list(old_items) == list(new_items):
        return
    entries = holder.get(key)
    if old_items and (not isinstance(entries, (AoT, Array)) or len(entries) != len(old_items)):
        raise _Unmergeable(key)
    old_ids = [ident(o) for o in old_items]
    new_ids = [ident(n) for n in new_items]
    new_set = set(new_ids)
    old_by_id = dict(zip(old_ids, old_items))
    kept = [i for i in old_ids if i in new_set]
    if new_ids[: len(kept)] != kept:
        raise _Unmergeable(f"{key}: order changed")
    for index in reversed(range(len(old_items))):
        if old_ids[index] not in new_set:
            _remove_entry(holder, key, entries, index)
    for index, item in enumerate(new_items[: len(kept)]):
        before = old_by_id[ident(item)]
        if before != item:
            merge_one(entries[index], before, item)
    added = new_items[len(kept):]
    if not new_items:
        if isinstance(entries, AoT):  # an emptied [[key]] list renders as nothing: say "key = []"
            del holder[key]
            _add_key(holder, key, tomlkit.array())
        return
    if not added:
        return
    # nothing above the first new [[table]] of the document is as good as a blank line
    top_blank = isinstance(holder, Container) and not holder.as_string().strip()
    if entries is None or (len(entries) == 0 and not isinstance(entries, AoT)):
        if entries is not None:
            del holder[key]
        entries = tomlkit.aot()
        container = _container(holder)
        if container is None:
            raise _Unmergeable(f"{key}: [[{key}]] inside an inline table")
        container.append(key, entries)
        if isinstance(holder, Table):
            dict.__setitem__(holder, key, entries)
    for item in added:
        if isinstance(entries, AoT):
            table = tomlkit.item(as_dict(item))
            _space_out(table)
            if entries.body:
                blank = _ends_with_blank_line(entries.body[-1].value)
            elif isinstance(holder, Table):
                blank = _ends_with_blank_line(holder.value)
            else:
                blank = top_blank or _ends_with_blank_line(holder)
            if not blank and "\n" not in table.trivia.indent:
                table.trivia.indent = "\n" + table.trivia.indent
            entries.append(table)
        else:
            entries.append(as_dict(item))


def _merge_server(table, old: Server, new: Server) -> None:
    _merge_fields(table, old, new, skip=("address",))


def _merge_port(table, old: Port, new: Port) -> None:
    _merge_fields(table, old, new, skip=("number", "servers"))
    _merge_list(table, "servers", old.servers, new.servers, lambda s: s.address, _merge_server, _server_dict)


def _merge_cluster(table, old: Cluster, new: Cluster) -> None:
    _merge_list(table, "ports", old.ports, new.ports, lambda p: p.number, _merge_port, _port_dict)


def _merge_advisor(table, old: Advisor, new: Advisor) -> None:
    before_keys = set(table.keys())
    _merge_fields(table, old, new, skip=("name", "port", "options"))
    options = table.get("options")
    if isinstance(options, InlineTable) and set(table.keys()) - before_keys:
        # a keyword added after "options = { … }": keep the options last, where they were
        del table["options"]
        _add_key(table, "options", options)
    if old.options == new.options:
        return
    if not new.options:
        if "options" in table:
            del table["options"]
        return
    if "options" not in table or isinstance(options, InlineTable):
        if "options" in table:
            table["options"] = _inline(dict(new.options))  # one line, no comments inside: replaced whole
        else:
            _add_key(table, "options", _inline(dict(new.options)))
        return
    if not isinstance(options, Table):
        raise _Unmergeable("advisors: options is not a table")
    before, after = dict(old.options), dict(new.options)
    for key in list(options.keys()):
        if key not in after:
            del options[key]
    for key, value in after.items():
        if before.get(key) != value or key not in options:
            options[key] = value


def _merge_document(doc, old: Config, new: Config) -> None:
    if old.executor != new.executor:
        if "executor" in doc:
            _merge_fields(doc["executor"], old.executor, new.executor)
        else:
            table = tomlkit.table()
            for name, value in _table(new.executor).items():
                table[name] = value
            _add_key(doc, "executor", table)
    _merge_list(
        doc, "clusters", old.clusters, new.clusters, lambda c: c.address, _merge_cluster, _cluster_dict
    )
    if old.advisors and not new.advisors:
        # the last advisor stopped: the tables go (with their comments), no "advisors = []" is left behind
        entries = doc.get("advisors")
        if isinstance(entries, AoT):
            if len(entries) != len(old.advisors):
                raise _Unmergeable("advisors")
            for index in reversed(range(len(entries))):
                _remove_entry(doc, "advisors", entries, index)
        if "advisors" in doc:
            del doc["advisors"]
        return
    _merge_list(
        doc, "advisors", old.advisors, new.advisors, lambda a: (a.name, a.port), _merge_advisor, _advisor_toml
    )

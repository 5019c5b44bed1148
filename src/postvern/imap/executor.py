"""The IMAP commands of the authenticated and selected states, executed against the store.

:class:`Executor` gets each :class:`~postvern.imap.protocol.CommandReceived` command once the
user has logged in, answers it with untagged responses through the connection and returns the
tagged completion. Store work runs in the store's worker threads, in bulk; the event loop only
builds small responses and writes. Changes made by other sessions arrive on the change feed
and are reported at the points RFC 9051 §7.5.1 allows (:meth:`Executor.report_changes`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from postvern.config import Limits
from postvern.directory.db import User
from postvern.imap import folders as names
from postvern.imap import search as s
from postvern.imap.fetch import RECENT, BatchResult, FetchPlan, Rendered, render_batch
from postvern.imap.grammar import commands as c
from postvern.imap.grammar.parse import UndecodableName
from postvern.imap.protocol import ImapConnection
from postvern.imap.searchexec import Universe, evaluate
from postvern.imap.selected import SelectedView
from postvern.imap.sequence import SequenceSet
from postvern.imap.serialize import (
    Code,
    Completion,
    Condition,
    ESearchData,
    ExistsData,
    ExpungeData,
    FetchData,
    FlagsData,
    ListData,
    QuotaData,
    QuotaRootData,
    RecentData,
    ResponseCode,
    SearchData,
    SortData,
    Status,
    StatusData,
    ThreadData,
    VanishedData,
)
from postvern.imap.sortthread import sort_messages, thread_messages
from postvern.store.mailbox import (
    DELIMITER,
    INBOX,
    BadFlag,
    BadFolderName,
    Change,
    Folder,
    FolderExists,
    FolderInUse,
    FolderStatus,
    Mailbox,
    MessageInfo,
    NoSuchFolder,
    OverQuota,
    StoreError,
)
from postvern.store.service import ChangeFeed, MailboxHandle

log = logging.getLogger(__name__)

T = TypeVar("T")
# RFC 9051 §7.5.1: no EXPUNGE while answering FETCH, STORE or SEARCH by message number, since
# the numbers in the answer would shift under the client; the UID forms are safe. SORT and
# THREAD answer with numbers too.
_NO_EXPUNGE_DURING = (c.Fetch, c.Store, c.Search, c.Sort, c.Thread)
# RFC 9208 §5.1: STORAGE is counted in units of 1024 octets.
KIB = 1024


class CommandFailed(Exception):
    """A command ends with this NO (or BAD) completion."""

    def __init__(self, status: Status, text: str, code: ResponseCode | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code


def _no(text: str, code: str | None = None) -> CommandFailed:
    return CommandFailed(Status.NO, text, ResponseCode(code) if code else None)


def _bad(text: str) -> CommandFailed:
    return CommandFailed(Status.BAD, text)


def _completion(tag: str, failure: CommandFailed) -> Completion:
    return Completion(tag, failure.status, failure.text, failure.code)


class Executor:
    """One logged-in session's commands. ``flush`` writes what the connection has queued and
    waits until the client has taken it (used between batches of a large answer)."""

    def __init__(
        self,
        conn: ImapConnection,
        handle: MailboxHandle,
        *,
        limits: Limits,
        flush: Callable[[], Awaitable[None]],
    ) -> None:
        self.conn = conn
        self.handle = handle
        self.box: Mailbox = handle.box
        self.user: User = handle.user
        # Subscribed only while a mailbox is selected: nothing else is ever reported.
        self.feed: ChangeFeed | None = None
        self.limits = limits
        self.flush = flush
        self.view: SelectedView | None = None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.handle.run(fn, *args, **kwargs)

    def send(self, response: Any) -> None:
        self.conn.send(response)

    # -- dispatch ---------------------------------------------------------------------------

    async def execute(self, command: c.Command) -> Completion:
        handler = self._handlers().get(type(command))
        if handler is None:
            return Completion.bad(command.tag, f"{command.name} is not available")
        try:
            completion = await handler(command)
        except CommandFailed as failure:
            completion = _completion(command.tag, failure)
        except BadFlag as e:
            completion = Completion.bad(command.tag, str(e))
        except OverQuota:
            completion = Completion.no(
                command.tag, "mailbox is over its storage quota", ResponseCode(Code.OVERQUOTA)
            )
        except StoreError as e:
            completion = Completion.no(command.tag, str(e), ResponseCode(Code.CANNOT))
        if self.view is not None:
            await self.report_changes(allow_expunge=not _forbids_expunge(command))
        if self.conn.condstore_enabling_tag == command.tag:
            self.conn.condstore_enabling_tag = None
            completion = self._with_highest_modseq(completion)
        return completion

    def _with_highest_modseq(self, completion: Completion) -> Completion:
        """RFC 7162 §3.1: the first command that enables CONDSTORE in the selected state
        reports the mailbox's HIGHESTMODSEQ in its tagged OK (in an untagged OK before it
        when the tagged one already carries a code, such as MODIFIED)."""
        if self.view is None or completion.status is not Status.OK:
            return completion
        code = ResponseCode.highest_modseq(self.view.reported_modseq)
        if completion.code is not None:
            self.send(Condition(Status.OK, "highest mod-sequence", code))
            return completion
        return Completion(completion.tag, completion.status, completion.text, code)

    def _handlers(self) -> dict[type, Callable[[Any], Awaitable[Completion]]]:
        return {
            c.Noop: self.noop,
            c.Check: self.noop,
            c.Select: self.select,
            c.Create: self.create,
            c.Delete: self.delete,
            c.Rename: self.rename,
            c.Subscribe: self.subscribe,
            c.Unsubscribe: self.subscribe,
            c.List: self.list_mailboxes,
            c.Lsub: self.lsub,
            c.Status: self.status,
            c.Append: self.append,
            c.GetQuota: self.get_quota,
            c.GetQuotaRoot: self.get_quota_root,
            c.Close: self.close,
            c.Unselect: self.close,
            c.Expunge: self.expunge,
            c.Search: self.search,
            c.Sort: self.sort_or_thread,
            c.Thread: self.sort_or_thread,
            c.Fetch: self.fetch,
            c.Store: self.store,
            c.Copy: self.copy,
            c.Move: self.copy,
        }

    async def noop(self, command: c.Noop | c.Check) -> Completion:
        if Mailbox.shared and self.view is not None:
            # NOOP is how a client polls (RFC 9051 §6.1.2): with several workers, look now at
            # what other processes committed instead of waiting for the next poll.
            await self.run(self.box.poll_external)
        return Completion.ok(command.tag, f"{command.name} completed")

    # -- folders ----------------------------------------------------------------------------

    async def _folder(self, name: str, *, trycreate: bool = False) -> Folder:
        if isinstance(name, UndecodableName):
            raise _no(f"no such mailbox: its name is {name.reason}", Code.NONEXISTENT)
        try:
            return await self.run(self.box.folder, name)
        except NoSuchFolder:
            code = Code.TRYCREATE if trycreate else Code.NONEXISTENT
            raise _no("no such mailbox", code) from None

    async def select(self, command: c.Select) -> Completion:
        if self.view is not None:
            self._deselect()
            # RFC 9051 §7.1 / RFC 7162 §3.2.11: the previous mailbox is closed first.
            self.send(Condition(Status.OK, "previous mailbox closed", ResponseCode(Code.CLOSED)))
        folder = await self._folder(command.mailbox)
        self.feed = self.handle.feed()  # before the snapshot: no change falls between
        try:
            rev1 = not self.conn.rev2
            claim = None if not rev1 else not command.read_only
            snapshot = await self.run(_select_snapshot, self.box, folder.id, rev1, claim)
            self.view = self._opened(*snapshot, command)
            if command.qresync is not None:
                await self._qresync(self.view, command.qresync)
        except BaseException:
            self._deselect()
            raise
        code = Code.READ_ONLY if command.read_only else Code.READ_WRITE
        return Completion.ok(command.tag, f"{command.name} completed", ResponseCode(code))

    def _opened(
        self,
        folder: Folder,
        uids: list[int],
        first_unseen: int | None,
        keywords: set[str],
        recent: list[int],
        command: c.Select,
    ) -> SelectedView:
        """The view of a selected folder, and the untagged data SELECT owes the client
        (RFC 9051 §6.3.2; RFC 3501 §6.3.1 for RECENT and UNSEEN)."""
        view = SelectedView(folder, uids, read_only=command.read_only, keywords=keywords)
        view.recent.update(recent)
        self._announce_flags(view)
        self.send(ExistsData(view.exists))
        if not self.conn.rev2:
            self.send(RecentData(len(view.recent)))
            if first_unseen is not None:
                number = view.map.number(first_unseen)
                self.send(Condition(Status.OK, "first unseen", ResponseCode("UNSEEN", (number,))))
        self.send(Condition(Status.OK, "UIDs valid", ResponseCode.uidvalidity(folder.uidvalidity)))
        self.send(Condition(Status.OK, "predicted next UID", ResponseCode.uidnext(folder.uidnext)))
        modseq = ResponseCode.highest_modseq(folder.highestmodseq)
        self.send(Condition(Status.OK, "highest mod-sequence", modseq))
        if self.conn.rev2:
            self.send(ListData(folder.name, _special(folder)))  # RFC 9051 §6.3.2
        return view

    def _flags(self, view: SelectedView, info: MessageInfo) -> tuple[str, ...]:
        """A message's flags as this session shows them: with \\Recent if it is one of the
        session's recent messages (RFC 3501 §2.3.2; never stored)."""
        return (*info.flags, RECENT) if info.uid in view.recent else info.flags

    def _announce_flags(self, view: SelectedView) -> None:
        """FLAGS and PERMANENTFLAGS as the session knows them (RFC 9051 §7.3.5, §7.1)."""
        self.send(FlagsData(view.flags_list()))
        permanent = ResponseCode.permanent_flags(view.permanent_flags())
        self.send(Condition(Status.OK, "flags", permanent))

    def _show_keywords(self, view: SelectedView, flags: Iterable[str]) -> None:
        """Before a FETCH shows ``flags``: announce the keywords among them that the client
        has not been told of (RFC 9051 §7.3.5: FLAGS first, then the FETCH that uses them)."""
        if view.learn_keywords(flags):
            self._announce_flags(view)

    async def _qresync(self, view: SelectedView, params: c.QResyncParams) -> None:
        """RFC 7162 §3.2.5.1: what vanished and what changed since the client's MODSEQ (if
        the client's UIDVALIDITY is still the folder's; otherwise it must start over)."""
        if params.uidvalidity != view.folder.uidvalidity:
            return
        folder_id = view.folder.id
        vanished, changed = await self.run(_changes_since, self.box, folder_id, params.modseq)
        if params.known_uids is not None:
            # "*" must reach the expunged UIDs too, which may lie above every UID left.
            ranges = params.known_uids.resolve(max([view.map.last_uid, *vanished]))
            vanished = [u for u in vanished if any(lo <= u <= hi for lo, hi in ranges)]
            changed = [m for m in changed if any(lo <= m.uid <= hi for lo, hi in ranges)]
        if vanished:
            self.send(VanishedData(vanished, earlier=True))
        self._show_keywords(view, (f for info in changed for f in info.flags))
        for info in changed:
            number = view.map.number(info.uid)
            if number is not None:
                flags = self._flags(view, info)
                items = [("UID", info.uid), ("FLAGS", flags), ("MODSEQ", info.modseq)]
                self.send(FetchData(number, items))

    def _deselect(self) -> None:
        self.view = None
        if self.feed is not None:
            self.feed.cancel()
            self.feed = None

    def close_feed(self) -> None:
        """The session is ending."""
        self._deselect()

    async def close(self, command: c.Close | c.Unselect) -> Completion:
        view = self.view
        if view is None:
            raise _bad("no mailbox is selected")
        if isinstance(command, c.Close) and not view.read_only:
            # RFC 9051 §6.4.1: CLOSE expunges silently.
            await self.run(self.box.expunge, view.folder.id, None, origin=self)
        self._deselect()
        return Completion.ok(command.tag, f"{command.name} completed")

    async def create(self, command: c.Create) -> Completion:
        name = command.mailbox
        if name.endswith(DELIMITER):
            # RFC 9051 §6.3.4: a trailing hierarchy separator only declares that names will
            # be created under this one; a server that needs no such declaration ignores it.
            name = name[: -len(DELIMITER)]
        _check_new_name(name)
        if names.reserved_name(name):
            raise _no("reserved mailbox name (#, ~, . or ..)", Code.CANNOT)
        uses = command.special_use
        if len(uses) > 1:
            raise _no("one special use per mailbox", "USEATTR")
        try:
            await self.run(self.box.create_folder, name, uses[0] if uses else None)
        except FolderExists:
            raise _no("mailbox already exists", Code.ALREADYEXISTS) from None
        except BadFolderName as e:
            raise _no(str(e), Code.CANNOT) from None
        except StoreError as e:
            if uses:  # RFC 6154 §5.1: an unsupported attribute
                raise _no(str(e), "USEATTR") from None
            raise
        return Completion.ok(command.tag, "CREATE completed")

    async def delete(self, command: c.Delete) -> Completion:
        folder = await self._folder(command.mailbox)
        if folder.name == INBOX:
            raise _no("INBOX cannot be deleted", Code.CANNOT)
        try:
            await self.run(self.box.delete_folder, folder.name)
        except FolderInUse as e:
            raise _no(str(e), Code.HASCHILDREN) from None
        if self.view is not None and self.view.folder.id == folder.id:
            self.view.pending.folder_changed = True
        return Completion.ok(command.tag, "DELETE completed")

    async def rename(self, command: c.Rename) -> Completion:
        await self._folder(command.mailbox)
        _check_new_name(command.new_name)
        if names.reserved_name(command.new_name):
            raise _no("reserved mailbox name (#, ~, . or ..)", Code.CANNOT)
        try:
            await self.run(self.box.rename_folder, command.mailbox, command.new_name)
        except FolderExists:
            raise _no("target mailbox already exists", Code.ALREADYEXISTS) from None
        except BadFolderName as e:
            raise _no(str(e), Code.CANNOT) from None
        return Completion.ok(command.tag, "RENAME completed")

    async def subscribe(self, command: c.Subscribe | c.Unsubscribe) -> Completion:
        subscribed = isinstance(command, c.Subscribe)
        if subscribed or isinstance(command.mailbox, UndecodableName):
            name = (await self._folder(command.mailbox)).name
        else:
            name = command.mailbox  # a subscribed name may outlive its folder (RFC 9051 §6.3.8)
        try:
            await self.run(self.box.subscribe_folder, name, subscribed)
        except NoSuchFolder:
            raise _no("no such mailbox", Code.NONEXISTENT) from None
        return Completion.ok(command.tag, f"{command.name} completed")

    async def list_mailboxes(self, command: c.List) -> Completion:
        if command.patterns == ("",) and not command.extended:
            self.send(names.root_answer())
            return Completion.ok(command.tag, "LIST completed")
        request = names.ListRequest.from_list(command)
        await self._list(request, command.return_status)
        return Completion.ok(command.tag, "LIST completed")

    async def lsub(self, command: c.Lsub) -> Completion:
        if command.pattern == "":
            self.send(ListData("", ["\\Noselect"], lsub=True))
            return Completion.ok(command.tag, "LSUB completed")
        await self._list(names.ListRequest.from_lsub(command), None)
        return Completion.ok(command.tag, "LSUB completed")

    async def _list(self, request: names.ListRequest, status: Sequence[str] | None) -> None:
        folders = await self.run(self.box.folders)
        subscriptions = await self.run(self.box.subscriptions) if request.subscribed_only else ()
        try:
            answers = names.list_folders(request, folders, subscriptions)
        except names.BadPattern as e:
            raise _bad(str(e)) from None
        statuses = {}
        if status:
            ids = [folder.id for _, folder in answers if folder is not None]
            statuses = await self.run(_statuses, self.box, ids)
        for data, folder in answers:
            self.send(data)
            if status and folder and folder.id in statuses:  # RFC 5819 §2: STATUS follows its LIST
                items = names.status_items(
                    status, statuses[folder.id], append_limit=self.limits.imap_literal
                )
                self.send(StatusData(folder.name, items))

    async def status(self, command: c.Status) -> Completion:
        folder = await self._folder(command.mailbox)
        status = await self.run(self.box.status, folder.id)
        if self.conn.rev2:
            status = replace(status, recent=0)  # RFC 9051 Appendix E: no \Recent
        elif self.view is not None and self.view.folder.id == folder.id:
            # The messages this session claimed are recent too (RFC 3501 §6.3.10).
            status = replace(status, recent=status.recent + len(self.view.recent))
        items = names.status_items(command.items, status, append_limit=self.limits.imap_literal)
        self.send(StatusData(folder.name, items))
        return Completion.ok(command.tag, "STATUS completed")

    async def append(self, command: c.Append) -> Completion:
        folder = await self._folder(command.mailbox, trycreate=True)
        if any(not m.data for m in command.messages):
            raise _no("an empty message cannot be stored", Code.CANNOT)
        items = [(m.data, m.flags, m.internal_date) for m in command.messages]
        uids, uidvalidity = await self.run(
            self.box.append_many, folder.id, items, quota=self._quota(), origin=self
        )
        code = ResponseCode.appenduid(uidvalidity, uids)
        return Completion.ok(command.tag, "APPEND completed", code)

    def _quota(self) -> int:
        return self.user.quota or self.limits.default_quota

    async def get_quota(self, command: c.GetQuota) -> Completion:
        if command.root != "":
            raise _no("no such quota root", Code.NONEXISTENT)
        await self._send_quota()
        return Completion.ok(command.tag, "GETQUOTA completed")

    async def get_quota_root(self, command: c.GetQuotaRoot) -> Completion:
        folder = await self._folder(command.mailbox)
        self.send(QuotaRootData(folder.name, [""]))
        await self._send_quota()
        return Completion.ok(command.tag, "GETQUOTAROOT completed")

    async def _send_quota(self) -> None:
        """RFC 9208 §5.1: one root, "", for the whole mailbox; STORAGE only if limited."""
        quota = self._quota()
        resources = []
        if quota:
            usage = await self.run(self.box.usage)
            resources.append(("STORAGE", -(-usage // KIB), quota // KIB))
        self.send(QuotaData("", resources))

    # -- messages ---------------------------------------------------------------------------

    def _selected(self, *, writable: bool = False) -> SelectedView:
        view = self.view
        if view is None:
            raise _bad("no mailbox is selected")
        if writable and view.read_only:
            raise _no("mailbox is read-only", Code.READ_ONLY)
        return view

    def _messages(self, sequence: SequenceSet, *, uid: bool) -> list[tuple[int, int]]:
        view = self._selected()
        if not uid and not view.numbers_valid(sequence):
            raise _bad("message number out of range")
        return view.resolve(sequence, uid=uid)

    async def expunge(self, command: c.Expunge) -> Completion:
        view = self._selected(writable=True)
        uids = None
        if command.uids is not None:
            uids = [uid for _, uid in view.resolve(command.uids, uid=True)]
        await self.run(self.box.expunge, view.folder.id, uids, origin=self)
        return Completion.ok(command.tag, f"{command.name} completed")

    def _universe(self, view: SelectedView) -> Universe:
        return Universe(view.map, frozenset(view.pending.expunged), tuple(view.saved))

    async def search(self, command: c.Search) -> Completion:
        view = self._selected()
        options = command.return_options
        try:
            criteria = _bind_recent(command.criteria, view.recent)
            matched, infos = await self.run(
                evaluate, self.box, view.folder.id, criteria, self._universe(view)
            )
        except Exception:
            if options and "SAVE" in options:
                view.saved = []  # RFC 5182 §2.1: a failed SEARCH (SAVE) empties $
            raise
        numbers = [uid if command.uid else number for number, uid in matched]
        if options is None and not self.conn.rev2:
            modseq = _highest_modseq(command.criteria, infos, matched)
            self.send(SearchData(numbers, modseq))
            return Completion.ok(command.tag, f"{command.name} completed")
        options = options or ("ALL",)
        if "SAVE" in options:
            view.saved = [uid for _, uid in matched]
        shown = set(options) - {"SAVE"}
        if shown:
            modseq = _highest_modseq(command.criteria, infos, _returned(matched, shown))
            self.send(_esearch(command, numbers, shown, modseq))
        return Completion.ok(command.tag, f"{command.name} completed")

    async def sort_or_thread(self, command: c.Sort | c.Thread) -> Completion:
        view = self._selected()
        folder_id, universe = view.folder.id, self._universe(view)
        command = replace(command, search=_bind_recent(command.search, view.recent))
        if isinstance(command, c.Sort):
            order = await self.run(sort_messages, self.box, folder_id, command, universe)
            self.send(SortData(order))
        else:
            threads = await self.run(thread_messages, self.box, folder_id, command, universe)
            self.send(ThreadData(threads))
        return Completion.ok(command.tag, f"{command.name} completed")

    async def fetch(self, command: c.Fetch) -> Completion:
        view = self._selected()
        pairs = self._messages(command.sequence, uid=command.uid)
        if command.vanished and command.changed_since is not None:
            await self._vanished_earlier(view, command.sequence, command.changed_since)
        plan = FetchPlan.build(command.items, read_only=view.read_only)
        present = [(n, u) for n, u in pairs if not view.is_expunged(u)]
        missing = len(pairs) - len(present)
        unknown_cte = False
        async for result in self._rendered(view, present, plan, command.changed_since):
            missing += len(result.missing)
            unknown_cte |= result.unknown_cte
            self._show_keywords(view, result.keywords)
            if result.data:
                self.send(Rendered(result.data))
                await self.flush()
        if unknown_cte:
            # RFC 3516 §4.2: a part whose encoding the server cannot undo.
            return Completion.no(
                command.tag, "unknown Content-Transfer-Encoding", ResponseCode(Code.UNKNOWN_CTE)
            )
        if missing:
            # RFC 5530: some of the messages were expunged by another session meanwhile.
            return Completion.ok(
                command.tag, "some messages were expunged", ResponseCode(Code.EXPUNGEISSUED)
            )
        return Completion.ok(command.tag, f"{command.name} completed")

    async def _rendered(
        self,
        view: SelectedView,
        pairs: list[tuple[int, int]],
        plan: FetchPlan,
        changed_since: int | None,
    ) -> AsyncIterator[BatchResult]:
        """The FETCH answers, batch by batch, in order. Metadata batches are rendered one
        ahead, so one worker thread's SQL (which releases the GIL) overlaps another's
        rendering and both overlap the socket write; body batches go one at a time and may
        stop early to bound memory."""

        def render(batch: list[tuple[int, int]]) -> asyncio.Future[BatchResult]:
            return asyncio.ensure_future(
                self.run(
                    render_batch,
                    self.box,
                    view.folder,
                    batch,
                    plan,
                    self.conn.wire_context,
                    changed_since=changed_since,
                    origin=self,
                    recent=frozenset(view.recent),
                )
            )

        size = plan.batch_size
        ahead: asyncio.Future[BatchResult] | None = None
        start = 0
        try:
            while start < len(pairs):
                current = ahead or render(pairs[start : start + size])
                ahead = None
                if not plan.needs_raw and start + size < len(pairs):
                    ahead = render(pairs[start + size : start + 2 * size])
                result = await current
                start += result.consumed
                yield result
        finally:
            if ahead is not None and not ahead.done():
                ahead.cancel()

    async def _vanished_earlier(
        self, view: SelectedView, sequence: SequenceSet, changed_since: int
    ) -> None:
        """RFC 7162 §3.2.6: UID FETCH (CHANGEDSINCE m VANISHED) first reports the UIDs in
        the set that were expunged after m."""
        gone = await self.run(self.box.vanished_since, view.folder.id, changed_since)
        ranges = sequence.resolve(max([view.map.last_uid, *gone], default=0), view.saved)
        gone = [u for u in gone if any(lo <= u <= hi for lo, hi in ranges)]
        if gone:
            self.send(VanishedData(gone, earlier=True))

    async def store(self, command: c.Store) -> Completion:
        view = self._selected(writable=True)
        pairs = [p for p in self._messages(command.sequence, uid=command.uid)]
        pairs = [(n, u) for n, u in pairs if not view.is_expunged(u)]
        operation = {"": "replace", "+": "add", "-": "remove"}[command.action.value]
        modified, infos = await self.run(
            _store,
            self.box,
            view.folder.id,
            [u for _, u in pairs],
            operation,
            command.flags,
            command.unchanged_since,
            self,
        )
        # The answers show each message's flags, whoever set them: the new keyword of this
        # STORE, and one another session set a moment ago.
        self._show_keywords(view, (f for info in infos.values() for f in info.flags))
        self._store_answers(command, view, pairs, infos, modified)
        if modified:
            by_uid = dict((u, n) for n, u in pairs)
            shown = modified if command.uid else [by_uid[u] for u in modified if u in by_uid]
            # RFC 7162 §3.1.3: the messages that failed the UNCHANGEDSINCE test.
            return Completion.ok(
                command.tag, "conditional STORE failed", ResponseCode.modified(shown)
            )
        return Completion.ok(command.tag, f"{command.name} completed")

    def _store_answers(
        self,
        command: c.Store,
        view: SelectedView,
        pairs: list[tuple[int, int]],
        infos: dict[int, MessageInfo],
        modified: Sequence[int],
    ) -> None:
        """RFC 9051 §6.4.6 FETCH answers; with .SILENT only the MODSEQ that CONDSTORE
        clients need (RFC 7162 §3.1.3)."""
        condstore = self.conn.condstore_enabled
        if command.silent and not condstore:
            return
        skipped = set(modified)
        for number, uid in pairs:
            info = infos.get(uid)
            if info is None or uid in skipped:
                continue
            items: list[tuple[str, object]] = []
            if not command.silent:
                items.append(("FLAGS", self._flags(view, info)))
            if command.uid or self.conn.qresync_enabled:
                items.append(("UID", uid))
            if condstore:
                items.append(("MODSEQ", info.modseq))
            self.send(FetchData(number, items))

    async def copy(self, command: c.Copy | c.Move) -> Completion:
        is_move = isinstance(command, c.Move)
        view = self._selected(writable=is_move)
        pairs = self._messages(command.sequence, uid=command.uid)
        uids = [u for n, u in pairs if not view.is_expunged(u)]
        target = await self._folder(command.mailbox, trycreate=True)
        if not uids:
            return Completion.ok(command.tag, f"{command.name} completed (no messages)")
        if is_move:
            moved, uidvalidity = await self.run(
                self.box.move, view.folder.id, uids, target.id, origin=self
            )
        else:
            moved, uidvalidity = await self.run(
                self.box.copy, view.folder.id, uids, target.id, quota=self._quota(), origin=self
            )
        if not moved:
            return Completion.ok(command.tag, f"{command.name} completed (no messages)")
        code = ResponseCode.copyuid(uidvalidity, [p[0] for p in moved], [p[1] for p in moved])
        if is_move:
            # RFC 6851 §4.3: COPYUID goes in an untagged OK, before the expunges.
            self.send(Condition(Status.OK, "moved", code))
            return Completion.ok(command.tag, f"{command.name} completed")
        return Completion.ok(command.tag, f"{command.name} completed", code)

    # -- changes from other sessions --------------------------------------------------------

    async def report_changes(self, *, allow_expunge: bool, first: Sequence[Change] = ()) -> None:
        """Send what changed in the selected mailbox since it was last reported; ``first``
        are changes already taken off the feed."""
        view, feed = self.view, self.feed
        if view is None or feed is None:
            return
        if feed.overflowed:
            await self._resync(view, feed)
        for change in [*first, *feed.drain()]:
            view.note(change, own_flags=change.origin is self)
        if view.pending.folder_changed and await self._folder_gone(view):
            return
        if allow_expunge:
            gone = view.take_expunged()
            if gone and self.conn.qresync_enabled:
                self.send(VanishedData([uid for _, uid in gone]))
            else:
                for number, _ in gone:
                    self.send(ExpungeData(number))
        if view.pending.appended:
            new = view.take_appended()
            if not self.conn.rev2:
                # RFC 3501 §7.3.2: the first session told of new mail has it as recent.
                claim = not view.read_only
                claimed = await self.run(self.box.take_recent, view.folder.id, new, claim=claim)
                view.recent.update(claimed)
            self.send(ExistsData(view.exists))
            if not self.conn.rev2:
                self.send(RecentData(len(view.recent)))
        changed = view.take_flag_changes()
        if changed:
            infos = await self.run(self.box.messages, view.folder.id, changed)
            self._flag_updates(view, infos)

    def _flag_updates(self, view: SelectedView, infos: Sequence[MessageInfo]) -> None:
        self._show_keywords(view, (f for info in infos for f in info.flags))
        condstore = self.conn.condstore_enabled
        for info in infos:
            number = view.map.number(info.uid)
            if number is None:
                continue
            items: list[tuple[str, object]] = [
                ("FLAGS", self._flags(view, info)),
                ("UID", info.uid),
            ]
            if condstore:
                items.append(("MODSEQ", info.modseq))  # RFC 7162 §3.1.4
            self.send(FetchData(number, items))

    async def _folder_gone(self, view: SelectedView) -> bool:
        """The folder list changed: if ours was deleted or renamed (a new UIDVALIDITY), the
        client's view cannot be repaired in band, so the session ends (RFC 9051 §7.1.5)."""
        view.pending.folder_changed = False
        try:
            folder = await self.run(self.box.folder_by_id, view.folder.id)
        except NoSuchFolder:
            folder = None
        if folder is not None and folder.uidvalidity == view.folder.uidvalidity:
            return False
        self._deselect()
        self.send(Condition(Status.BYE, "the selected mailbox was deleted or renamed"))
        return True

    async def _resync(self, view: SelectedView, feed: ChangeFeed) -> None:
        """The feed overflowed (changes were dropped): recompute the pending changes from
        the store itself."""
        feed.drain()
        feed.overflowed = False
        uids, changed = await self.run(_resync_state, self.box, view.folder.id, view.resync_from)
        present = set(uids)
        view.pending.expunged |= {u for u in view.map if u not in present}
        last = view.map.last_uid
        view.pending.appended = [u for u in uids if u > last]
        view.pending.flags |= {m.uid for m in changed if view.map.number(m.uid) is not None}
        view.resync_from = max([view.resync_from, *(m.modseq for m in changed)])


# -- worker-thread functions (each one store round trip) ----------------------------------


def _select_snapshot(
    box: Mailbox, folder_id: int, want_unseen: bool, claim_recent: bool | None
) -> tuple[Folder, list[int], int | None, set[str], list[int]]:
    """The folder, its UIDs, (for IMAP4rev1's [UNSEEN n]) its first unseen message, the
    keywords in use in it, and the messages recent in this session (None: IMAP4rev2, which
    has no \\Recent; True: claim them, as a read-write SELECT does)."""
    folder = box.folder_by_id(folder_id)
    uids = box.uids(folder_id)
    first_unseen = None
    if want_unseen and box.status(folder_id).unseen:
        first_unseen = _first_unseen(box, folder_id, uids)
    recent = []
    if claim_recent is not None:
        recent = box.take_recent(folder_id, uids, claim=claim_recent)
    return folder, uids, first_unseen, box.keywords(folder_id), recent


# Metadata is read in slices while looking for the first unseen message: the oldest mail is
# usually read, but the scan stops at the first hit instead of loading the whole folder.
_UNSEEN_SCAN = 2000


def _first_unseen(box: Mailbox, folder_id: int, uids: list[int]) -> int | None:
    for start in range(0, len(uids), _UNSEEN_SCAN):
        for info in box.messages(folder_id, uids[start : start + _UNSEEN_SCAN]):
            if "\\Seen" not in info.flags:
                return info.uid
    return None


def _changes_since(
    box: Mailbox, folder_id: int, modseq: int
) -> tuple[list[int], list[MessageInfo]]:
    return box.vanished_since(folder_id, modseq), box.changed_since(folder_id, modseq)


def _statuses(box: Mailbox, folder_ids: Sequence[int]) -> dict[int, FolderStatus]:
    return {folder_id: box.status(folder_id) for folder_id in folder_ids}


def _store(
    box: Mailbox,
    folder_id: int,
    uids: list[int],
    operation: str,
    flags: Sequence[str],
    unchanged_since: int | None,
    origin: object,
) -> tuple[tuple[int, ...], dict[int, MessageInfo]]:
    result = box.store_flags(
        folder_id, uids, operation, flags, unchangedsince=unchanged_since, origin=origin
    )
    infos = {m.uid: m for m in box.messages(folder_id, uids)}
    return result.modified, infos


def _resync_state(box: Mailbox, folder_id: int, modseq: int) -> tuple[list[int], list[MessageInfo]]:
    return box.uids(folder_id), box.changed_since(folder_id, modseq)


# -- helpers ------------------------------------------------------------------------------


def _bind_recent(key: s.SearchKey, recent: set[int]) -> s.SearchKey:
    """RFC 3501 RECENT, NEW and OLD test \\Recent, which only the session knows: each such
    test becomes a test of the session's recent UIDs (none in IMAP4rev2)."""
    if isinstance(key, s.FlagTest) and key.flag.lower() == RECENT.lower():
        test = _uid_test(recent)
        return test if key.present else s.Not(test)
    if isinstance(key, s.Not):
        return s.Not(_bind_recent(key.key, recent))
    if isinstance(key, s.Or):
        return s.Or(_bind_recent(key.left, recent), _bind_recent(key.right, recent))
    if isinstance(key, s.And):
        return s.And(tuple(_bind_recent(k, recent) for k in key.keys))
    return key


def _uid_test(uids: set[int]) -> s.SearchKey:
    """A search key matching exactly ``uids`` (as runs of consecutive UIDs)."""
    if not uids:
        return s.Not(s.All())
    runs: list[tuple[int | None, int | None]] = []
    for uid in sorted(uids):
        if runs and runs[-1][1] == uid - 1:
            runs[-1] = (runs[-1][0], uid)
        else:
            runs.append((uid, uid))
    return s.SequenceTest(SequenceSet(tuple(runs)), uid=True)


def _check_new_name(name: str) -> None:
    """CREATE and RENAME refuse a name that is valid syntax but no mailbox name."""
    if isinstance(name, UndecodableName):
        raise _no(f"invalid mailbox name: {name.reason}", Code.CANNOT)


def _forbids_expunge(command: c.Command) -> bool:
    return isinstance(command, _NO_EXPUNGE_DURING) and not getattr(command, "uid", False)


def _special(folder: Folder) -> list[str]:
    return [folder.special_use] if folder.special_use else []


def _highest_modseq(
    criteria: s.SearchKey, infos: dict[int, MessageInfo] | None, matched: Sequence[tuple[int, int]]
) -> int | None:
    """RFC 7162 §3.1.5: a search with MODSEQ reports the highest mod-sequence it matched."""
    if infos is None or not matched:
        return None
    if not any(isinstance(key, s.ModSeqTest) for key in s.walk(criteria)):
        return None
    return max(infos[uid].modseq for _, uid in matched if uid in infos)


def _returned(matched: list[tuple[int, int]], options: set[str]) -> list[tuple[int, int]]:
    """The messages an ESEARCH answer is about: all matches for ALL or COUNT; with only MIN
    and/or MAX, just those (RFC 7162 §3.1.5: then MODSEQ is theirs, not the highest of all)."""
    if options & {"ALL", "COUNT"} or not matched:
        return matched
    return [p for p, name in ((matched[0], "MIN"), (matched[-1], "MAX")) if name in options]


def _esearch(
    command: c.Search, numbers: list[int], options: set[str], modseq: int | None
) -> ESearchData:
    """RFC 4731 §3.1: MIN/MAX/COUNT/ALL as asked; nothing but COUNT 0 for no match."""
    return ESearchData(
        tag=command.tag,
        uid=command.uid,
        min=min(numbers) if "MIN" in options and numbers else None,
        max=max(numbers) if "MAX" in options and numbers else None,
        count=len(numbers) if "COUNT" in options else None,
        all=numbers if "ALL" in options and numbers else None,
        modseq=modseq,
    )

"""Property tests: journal replay against a small model of the engine (reference §6.4/§6.5).

The model runs random updates over a random base deployment. For every step it emits
the journal entries the CLI would send and, independently, keeps the state a
checkpointing engine would have written at that moment (updated and new resources
first, in completion order, then what is left of the base in base order). Replaying
the entries, in any arrival order and with retried duplicates, must reproduce each of
those states, and every state must pass the CLI's integrity checks (§6.8).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pulumid.engine.journal import (
    KIND_BEGIN,
    KIND_FAILURE,
    KIND_OUTPUTS,
    KIND_REBUILT_BASE_STATE,
    KIND_REFRESH_SUCCESS,
    KIND_SECRETS_MANAGER,
    KIND_SUCCESS,
    KIND_WRITE,
    JournalReplayer,
)

NOW = "2024-05-01T10:00:00Z"
VERSION = "3.259.0"
STACK_URN = "urn:pulumi:dev::demo::pulumi:pulumi:Stack::demo-dev"
PROVIDER_URN = "urn:pulumi:dev::demo::pulumi:providers:test::default"
PROVIDER_REF = f"{PROVIDER_URN}::prov-id"
THING = "test:index:Thing"
COMP = "test:index:Comp"
PASSPHRASE = {"type": "passphrase", "state": {"salt": "s1"}}
SERVICE = {"type": "service", "state": {"url": "https://example", "stack": "dev"}}

Resource = dict[str, Any]


def stack_resource() -> Resource:
    return {"urn": STACK_URN, "custom": False, "type": "pulumi:pulumi:Stack"}


def provider_resource() -> Resource:
    return {"urn": PROVIDER_URN, "custom": True, "id": "prov-id", "type": "pulumi:providers:test"}


def references(res: Resource) -> list[str]:
    """Every URN a resource needs to find earlier in the list."""
    refs = list(res.get("dependencies", []))
    for urns in res.get("propertyDependencies", {}).values():
        refs += urns
    for key in ("parent", "deletedWith"):
        if res.get(key):
            refs.append(res[key])
    if res.get("provider"):
        refs.append(res["provider"].rsplit("::", 1)[0])
    return refs


def prune(resources: list[Resource]) -> list[Resource]:
    """What a refresh leaves behind: references to resources that are gone are dropped."""
    present = {r["urn"] for r in resources}
    out = []
    for res in resources:
        res = dict(res)
        if "dependencies" in res:
            res["dependencies"] = [d for d in res["dependencies"] if d in present]
        if "propertyDependencies" in res:
            res["propertyDependencies"] = {
                k: kept
                for k, urns in res["propertyDependencies"].items()
                if (kept := [d for d in urns if d in present])
            }
        for key in ("parent", "deletedWith"):
            if res.get(key) not in present:
                res.pop(key, None)
        for key in ("dependencies", "propertyDependencies"):
            if not res.get(key, True):
                del res[key]
        out.append(res)
    return out


@st.composite
def bases(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.integers(0, 9)) == 0:
        return {"manifest": {"time": NOW, "magic": "", "version": ""}, "resources": None}
    resources = [stack_resource(), provider_resource()]
    for k in range(draw(st.integers(0, 7))):
        kind = draw(st.sampled_from(["comp", "thing", "thing", "external"]))
        type_ = COMP if kind == "comp" else THING
        earlier = resources[2:]
        parent = draw(st.sampled_from([None, *earlier]))
        qualified = f"{parent['urn'].split('::')[2]}${type_}" if parent else type_
        res: Resource = {
            "urn": f"urn:pulumi:dev::demo::{qualified}::r{k}",
            "custom": kind != "comp",
            "type": type_,
            "parent": parent["urn"] if parent else STACK_URN,
            "inputs": {"v": 0},
        }
        if kind != "comp":
            res["id"] = f"id-r{k}"
            res["provider"] = PROVIDER_REF
        if kind == "external":
            res["external"] = True
        if earlier:
            deps = draw(st.lists(st.sampled_from([r["urn"] for r in earlier]), unique=True))
            if deps:
                res["dependencies"] = deps
                if draw(st.booleans()):
                    res["propertyDependencies"] = {"p": deps[:1], "q": deps[1:]}
                if draw(st.integers(0, 3)) == 0:
                    res["deletedWith"] = deps[-1]
        if draw(st.integers(0, 5)) == 0:
            res["taint"] = True
        resources.append(res)
    ops = draw(
        st.lists(st.sampled_from(["creating", "updating", "deleting", "reading"]), max_size=2)
    )
    base: dict[str, Any] = {
        "manifest": {"time": NOW, "magic": "", "version": ""},
        "metadata": {},
        "resources": resources,
    }
    if ops:
        base["pending_operations"] = [
            {"resource": {"urn": f"urn:pulumi:dev::demo::{THING}::op{n}", "type": THING}, "type": t}
            for n, t in enumerate(ops)
        ]
    if draw(st.booleans()):
        base["secrets_providers"] = PASSPHRASE
    return base


@dataclass
class Step:
    kind: str  # same update create read cbd dbr_delete dbr_create delete refresh outputs
    index: int | None = None  # the base resource it supersedes, if any
    state: Resource | None = None  # the resulting resource
    outcome: str = ""  # refresh: same, changed or deleted
    prereqs: set[int] = field(default_factory=set)
    is_stack: bool = False
    op: int = 0
    task: int = 0


OPERATION_TYPES = {
    "update": "updating",
    "create": "creating",
    "cbd": "creating",
    "dbr_create": "creating",
    "read": "reading",
    "delete": "deleting",
    "dbr_delete": "deleting",
}


class Model:
    """A tiny engine: runs steps, emits journal entries, and knows the right snapshot."""

    def __init__(self, base: dict[str, Any], data: st.DataObject) -> None:
        self.data = data
        self.original_secrets = base.get("secrets_providers")
        self.base_res: list[Resource | None] = copy.deepcopy(base.get("resources") or [])
        self.base_pending: list[dict[str, Any]] = copy.deepcopy(
            base.get("pending_operations") or []
        )
        self.secrets = copy.deepcopy(self.original_secrets)
        self.metadata = copy.deepcopy(base.get("metadata") or {})
        self.new: list[Resource] = []
        self.open_ops: dict[int, dict[str, Any]] = {}
        self.refreshed = False
        self.seq = 0
        self.op = 0
        self.stack_pos = -1
        self.stack_op = 0
        self.entries: list[dict[str, Any]] = []
        self.expected: list[dict[str, Any]] = [self.snapshot()]
        self.tasks = 0
        self.fail_task = data.draw(st.none() | st.integers(0, 25), label="fail_task")
        self.stopped = False  # a step failed: finish what runs, start nothing new

    # -- journal and snapshot --

    def next_op(self) -> int:
        self.op += 1
        return self.op

    def emit(self, kind: int, op: int, **fields: Any) -> None:
        """Record an entry; the model's state must already include its effect."""
        self.seq += 1
        entry = {
            "version": 1,
            "kind": kind,
            "sequenceID": self.seq,
            "operationID": op,
            "removeOld": None,
            "removeNew": None,
        }
        entry.update(copy.deepcopy(fields))
        self.entries.append(entry)
        self.expected.append(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        resources = self.new + [r for r in self.base_res if r is not None]
        ops = [self.open_ops[k] for k in sorted(self.open_ops)]
        ops += [op for op in self.base_pending if op["type"] == "creating"]
        tainted = any(r.get("taint") for r in resources + [op["resource"] for op in ops])
        if self.refreshed:
            resources = prune(resources)
        deployment: dict[str, Any] = {
            "manifest": {
                "time": NOW,
                "magic": hashlib.sha256(VERSION.encode()).hexdigest(),
                "version": VERSION,
            }
        }
        if self.secrets is not None:
            deployment["secrets_providers"] = self.secrets
        if resources:
            deployment["resources"] = resources
        if ops:
            deployment["pending_operations"] = ops
        deployment["metadata"] = self.metadata
        result: dict[str, Any] = (
            {"version": 4, "features": ["taint"]} if tainted else {"version": 3}
        )
        result["deployment"] = deployment
        return copy.deepcopy(result)

    # -- steps --

    def start(self, step: Step) -> None:
        if step.kind == "outputs":
            # Stack outputs overwrite the stack resource that this update produced.
            step.op = self.next_op()
            state = {**self.new[self.stack_pos], "outputs": {"o": step.op}}
            self.new[self.stack_pos] = state
            self.emit(KIND_OUTPUTS, step.op, removeNew=self.stack_op, state=state)
            return
        if step.kind == "dbr_create":
            self.next_op()  # the replace step between the two takes an ID but sends nothing
        step.op = self.next_op()
        op_type = OPERATION_TYPES.get(step.kind)
        if op_type is None:  # same and refresh begins carry no operation
            self.emit(KIND_BEGIN, step.op)
            return
        target = step.state
        if step.index is not None and "delete" in step.kind:
            target = self.base_res[step.index]
        assert target is not None
        operation = {"resource": copy.deepcopy(target), "type": op_type}
        self.open_ops[step.op] = operation
        self.emit(KIND_BEGIN, step.op, operation=operation)

    def finish(self, step: Step, ok: bool) -> None:
        self.open_ops.pop(step.op, None)
        kind, i, state = step.kind, step.index, step.state
        if not ok:
            fields: dict[str, Any] = {}
            if state is not None:
                fields["state"] = state  # the replay must ignore it
            # Failures carry the same references a success would (all ignored).
            if kind in ("same", "update", "read", "dbr_create", "refresh") and i is not None:
                fields["removeOld"] = i
            if kind == "cbd":
                fields["deleteOld"] = i
            if kind == "refresh":
                fields["isRefresh"] = True
            self.emit(KIND_FAILURE, step.op, **fields)
            return
        if kind == "refresh":
            assert i is not None
            self.refreshed = True
            old = self.base_res[i]
            assert old is not None
            if step.outcome == "deleted":
                self.base_res[i] = None
                self.emit(KIND_REFRESH_SUCCESS, step.op, removeOld=i, isRefresh=True)
            else:
                new = old if step.outcome == "same" else {**old, "outputs": {"drift": step.op}}
                self.base_res[i] = new
                self.emit(KIND_REFRESH_SUCCESS, step.op, removeOld=i, isRefresh=True, state=new)
        elif kind in ("same", "update", "read", "dbr_create", "create"):
            assert state is not None
            self.new.append(state)
            if step.is_stack:
                self.stack_pos, self.stack_op = len(self.new) - 1, step.op
            if i is None:
                self.emit(KIND_SUCCESS, step.op, state=state)
            else:
                self.base_res[i] = None
                self.emit(KIND_SUCCESS, step.op, state=state, removeOld=i)
        elif kind == "cbd":
            assert state is not None and i is not None
            self.new.append(state)
            self.base_res[i] = {**(self.base_res[i] or {}), "delete": True}
            self.emit(KIND_SUCCESS, step.op, state=state, deleteOld=i)
            self.next_op()  # the replace step
        elif kind == "dbr_delete":
            assert i is not None
            self.base_res[i] = {**(self.base_res[i] or {}), "pendingReplacement": True}
            self.emit(KIND_SUCCESS, step.op, pendingReplacementOld=i)
        elif kind == "delete":
            assert i is not None
            self.base_res[i] = None
            self.emit(KIND_SUCCESS, step.op, removeOld=i)

    def schedule(self, steps: list[Step]) -> None:
        """Run steps in order, several at a time; a step starts once its prerequisites end."""
        done: set[int] = set()
        running: list[int] = []
        next_step = 0
        while True:
            options = list(range(len(running)))
            if (
                not self.stopped
                and next_step < len(steps)
                and steps[next_step].prereqs <= done
                and len(running) < 3
            ):
                options.insert(0, -1)  # starting first: concurrency by default
            if not options:
                return
            choice = options[self.data.draw(st.integers(0, len(options) - 1))]
            if choice == -1:
                step = steps[next_step]
                step.task, self.tasks = self.tasks, self.tasks + 1
                self.start(step)
                if step.kind == "outputs":
                    done.add(next_step)
                else:
                    running.append(next_step)
                next_step += 1
            else:
                n = running.pop(choice)
                ok = steps[n].task != self.fail_task
                self.finish(steps[n], ok)
                if ok:
                    done.add(n)
                else:
                    self.stopped = True

    # -- a whole update --

    def run(self) -> None:
        draw = self.data.draw
        provider = draw(st.sampled_from([PASSPHRASE, SERVICE]))
        self.secrets = provider
        self.emit(KIND_SECRETS_MANAGER, 0, secretsProvider=provider)

        if draw(st.integers(0, 4)) == 0:
            # The engine migrated its base and sends it whole before any step.
            snapshot: dict[str, Any] = {
                "manifest": {"time": NOW, "magic": "", "version": ""},
                "metadata": self.metadata,
                "resources": [{**r, "m": 1} for r in self.base_res if r is not None],
                "pending_operations": self.base_pending,
            }
            if self.original_secrets is not None:
                snapshot["secrets_providers"] = self.original_secrets
            self.base_res = copy.deepcopy(snapshot["resources"])
            self.secrets = copy.deepcopy(self.original_secrets)
            self.emit(KIND_WRITE, 0, newSnapshot=snapshot)

        do_refresh = draw(st.booleans())
        do_update = not do_refresh or draw(st.booleans())
        if do_refresh:
            self.refresh_phase()
            if do_update and not self.stopped:
                # The engine rebuilt its base; later indices refer to that.
                assert not self.new and not self.open_ops
                kept = [r for r in self.base_res if r is not None]
                self.base_res = list(prune(kept) if self.refreshed else kept)
                self.base_pending = [op for op in self.base_pending if op["type"] == "creating"]
                self.emit(KIND_REBUILT_BASE_STATE, 0)
        if do_update and not self.stopped:
            self.update_phase()

    def refresh_phase(self) -> None:
        candidates = [
            i
            for i, r in enumerate(self.base_res)
            if r is not None and r["custom"] and r["type"] == THING
        ]
        chosen = (
            self.data.draw(st.lists(st.sampled_from(candidates), unique=True)) if candidates else []
        )
        steps = [
            Step(
                "refresh",
                index=i,
                outcome=self.data.draw(st.sampled_from(["same", "changed", "deleted"])),
            )
            for i in chosen
        ]
        self.schedule(steps)

    def update_phase(self) -> None:
        draw = self.data.draw
        base = self.base_res
        index = {r["urn"]: i for i, r in enumerate(base) if r is not None}

        # Base resources the program no longer declares, unless something kept needs them.
        wish = {i: draw(st.integers(0, 3)) == 0 for i in index.values()}
        keep: set[int] = set()
        for i in sorted(index.values(), reverse=True):
            res = base[i]
            assert res is not None
            if res["urn"] in (STACK_URN, PROVIDER_URN) or not wish[i] or i in keep:
                keep.add(i)
                keep.update(index[u] for u in references(res))

        program: list[Step] = []
        for urn, make in ((STACK_URN, stack_resource), (PROVIDER_URN, provider_resource)):
            if urn in index:
                program.append(Step("same", index=index[urn], state=base[index[urn]]))
            else:
                program.append(Step("create", state=make()))
        program[0].is_stack = True
        rest: list[Step] = []
        for i in sorted(keep):
            res = base[i]
            assert res is not None
            if res["urn"] in (STACK_URN, PROVIDER_URN):
                continue
            kinds = ["same", "update"]
            if res.get("external"):
                kinds.append("read")
            elif res["custom"]:
                kinds += ["cbd", "dbr"]
            kind = draw(st.sampled_from(kinds))
            if kind == "same":
                rest.append(Step("same", index=i, state=res))
            elif kind == "update":
                rest.append(Step("update", index=i, state={**res, "inputs": {"v": 1}}))
            elif kind == "read":
                rest.append(Step("read", index=i, state={**res, "outputs": {"read": 1}}))
            elif kind == "cbd":
                rest.append(Step("cbd", index=i, state={**res, "id": res["id"] + "-2"}))
            else:
                rest.append(Step("dbr_delete", index=i))
                rest.append(Step("dbr_create", index=i, state={**res, "id": res["id"] + "-3"}))
        for n in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(rest)))
            earlier = [s.state["urn"] for s in rest[:at] if s.state is not None]
            parent = draw(st.sampled_from([STACK_URN, *earlier]))
            res = {
                "urn": f"urn:pulumi:dev::demo::{THING}::n{n}",
                "custom": True,
                "id": f"id-n{n}",
                "type": THING,
                "parent": parent,
                "provider": PROVIDER_REF,
            }
            deps = draw(st.lists(st.sampled_from(earlier), unique=True)) if earlier else []
            if deps:
                res["dependencies"] = deps
            if draw(st.integers(0, 4)) == 0:
                res["taint"] = True
            if draw(st.booleans()):
                rest.insert(at, Step("create", state=res))
            else:
                rest.insert(at, Step("read", state={**res, "external": True}))
        program += rest

        # A step waits for the steps that produce what it refers to.
        ready: dict[str, int] = {}
        for n, step in enumerate(program):
            if step.state is not None:
                step.prereqs = {ready[u] for u in references(step.state)}
            if step.kind == "dbr_create":
                step.prereqs.add(
                    next(
                        m
                        for m, s in enumerate(program)
                        if s.kind == "dbr_delete" and s.index == step.index
                    )
                )
            if step.kind != "dbr_delete":
                assert step.state is not None
                ready[step.state["urn"]] = n
        everything = set(range(len(program)))
        steps = list(program)
        steps.append(Step("outputs", prereqs=set(everything)))
        everything.add(len(steps) - 1)

        # Deletions last, dependents before what they depend on.
        doomed = [i for i in index.values() if i not in keep]
        doomed += [s.index for s in program if s.kind == "cbd" and s.index is not None]
        delete_step: dict[int, int] = {}
        for i in sorted(doomed, reverse=True):
            res = base[i]
            assert res is not None
            needed_by = {
                delete_step[j] for j in delete_step if res["urn"] in references(base[j] or {})
            }
            steps.append(Step("delete", index=i, prereqs=everything | needed_by))
            delete_step[i] = len(steps) - 1
        self.schedule(steps)


def check_integrity(result: dict[str, Any]) -> None:
    """The checks the CLI runs on a snapshot before using it (§6.8)."""
    deployment = result["deployment"]
    manifest = deployment["manifest"]
    expected_magic = hashlib.sha256(manifest["version"].encode()).hexdigest()
    assert manifest["magic"] == (expected_magic if manifest["version"] else "")
    seen: set[str] = set()
    providers: set[str] = set()
    live: dict[str, int] = {}
    for res in deployment.get("resources", []):
        urn = res.get("urn")
        assert urn and res.get("type"), res
        if not res.get("custom"):
            assert not res.get("id"), f"{urn} is not custom but has an id"
        if res["type"].startswith("pulumi:providers:"):
            providers.add(f"{urn}::{res.get('id', '')}")
        if res.get("provider") and not res.get("pendingReplacement"):
            assert res["provider"] in providers, f"{urn}: provider not before it"
        for ref in references({k: v for k, v in res.items() if k != "provider"}):
            assert ref in seen, f"{urn} refers to {ref}, which is not before it"
        seen.add(urn)
        if not res.get("delete"):
            live[urn] = live.get(urn, 0) + 1
            assert live[urn] == 1, f"two live copies of {urn}"


# Built (and so its module imported) while the test module loads: imported lazily inside a
# test, pytest's rewrite of that module once met CPython 3.11's AST recursion-depth check
# thrown off by another thread ("SystemError: AST constructor recursion depth mismatch").
RANDOMS = st.randoms(use_true_random=False)
RANDOMS.validate()


def arrival(data: st.DataObject, entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Entries as they might reach the server: reordered, some sent twice, in batches."""
    rnd = data.draw(RANDOMS, label="arrival")
    stream = list(entries)
    if rnd.random() < 0.5:
        rnd.shuffle(stream)
    else:  # concurrent steps: only neighbours swap
        for n in range(len(stream) - 1):
            if rnd.random() < 0.3:
                stream[n], stream[n + 1] = stream[n + 1], stream[n]
    for _ in range(rnd.randint(0, 4)):
        if entries:
            stream.insert(rnd.randint(0, len(stream)), copy.deepcopy(rnd.choice(entries)))
    batches = []
    while stream:
        size = rnd.randint(1, 8)
        batches.append(stream[:size])
        del stream[:size]
    return batches


def with_byte_string(result: dict[str, Any]) -> dict[str, Any]:
    features = sorted({*result.get("features", []), "byteString"})
    return {"version": 4, "features": features, "deployment": result["deployment"]}


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(base=bases(), data=st.data())
def test_replay_matches_the_model(base: dict[str, Any], data: st.DataObject) -> None:
    model = Model(base, data)
    model.run()
    entries, expected = model.entries, model.expected
    # A crashed CLI: whatever it sent up to some entry, with operations left open.
    cut = data.draw(st.none() | st.integers(0, len(entries)), label="crash")
    if cut is not None:
        entries, expected = entries[:cut], expected[: cut + 1]

    # Some entry saw a string that is not UTF-8: byteString from then on.
    marked = None
    if entries:
        marked = data.draw(st.none() | st.integers(1, len(entries)), label="byte_string")
    if marked is not None:
        entries[marked - 1]["requiresByteString"] = True
        expected[marked:] = [with_byte_string(e) for e in expected[marked:]]

    for snapshot in expected:
        check_integrity(snapshot)

    in_order = JournalReplayer(copy.deepcopy(base))
    in_order.add(entries)
    assert in_order.generate(now_iso=NOW, engine_version=VERSION) == expected[-1]

    replayer = JournalReplayer(copy.deepcopy(base))
    for batch in arrival(data, entries):
        replayer.add(batch)
        result = replayer.generate(now_iso=NOW, engine_version=VERSION)
        if replayer.pending_count == 0:
            # A contiguous prefix: exactly what the engine had at that point.
            assert result == expected[replayer.applied_through]
            check_integrity(result)
    assert (replayer.applied_through, replayer.entry_count) == (len(entries), len(entries))
    final = replayer.generate(now_iso=NOW, engine_version=VERSION)
    assert final == expected[-1]
    assert replayer.generate(now_iso=NOW, engine_version=VERSION) == final

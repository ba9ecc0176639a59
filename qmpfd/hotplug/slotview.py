"""What ``query-slots`` shows of a slot table: every slot of every hotpluggable bus and the
occupied slots of the others, each with its state and functions (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from qmpfd.hotplug.slots import SlotKey, SlotState, SlotTable


@dataclass(frozen=True)
class FunctionView:
    function: int
    id: str | None
    driver: str
    state: SlotState


@dataclass(frozen=True)
class SlotView:
    bus: str
    slot: int
    hotpluggable: bool
    state: SlotState
    functions: tuple[FunctionView, ...]


def view(table: SlotTable, queued: dict[SlotKey, list[tuple[int, str, str]]]) -> list[SlotView]:
    """Every slot of every hotpluggable bus and the occupied slots of the others;
    ``queued`` adds the queued functions (function, id, driver) of each slot."""
    out = []
    for b in table.topology.buses:
        for s in b.slots():
            key = (b.name, s.slot)
            state = table.state(key)
            funcs = [FunctionView(f.function, f.id, f.driver,
                                  SlotState.PRESENT if state is SlotState.QUEUED else state)
                     for f in s.functions]
            funcs += [FunctionView(fn, i, d, SlotState.QUEUED)
                      for fn, i, d in queued.get(key, [])]
            out.append(SlotView(b.name, s.slot, s.hotpluggable, state,
                                tuple(sorted(funcs, key=lambda f: f.function))))
    return out

"""Prediction rows leave a model actor a batch at a time, so the driver stages them at the README's cadence:
`rows_leave_each_batch(udf)` registers `RowsPerBatch`, a physical-plan rule that caps the output blocks of that
UDF's operator at its batch size; other operators keep Ray's byte-sized blocks.
Why: docs/design-notes.md#pipelinerayblockspy"""

from __future__ import annotations

from ray.data._internal.execution.operators.map_operator import MapOperator
from ray.data._internal.logical.interfaces import PhysicalPlan, Rule
from ray.data._internal.logical.operators import MapBatches
from ray.data._internal.logical.optimizers import get_physical_ruleset
from ray.data._internal.logical.rules import FuseOperators
from ray.data._internal.output_buffer import OutputBlockSizeOption


def rows_leave_each_batch(udf: type) -> None:
    """From now on, plans of this process hand on the rows of `udf`'s map_batches operator a batch at a time."""
    RowsPerBatch.udfs.add(udf)
    ruleset = get_physical_ruleset()
    if RowsPerBatch not in list(ruleset):
        ruleset.add(RowsPerBatch)


class RowsPerBatch(Rule):
    """Caps the output blocks of the operators that run a registered UDF at that operator's batch size."""
    udfs: set[type] = set()

    @classmethod
    def dependencies(cls) -> list[type[Rule]]:
        return [FuseOperators]  # the operator the rows leave, fused or not

    def apply(self, plan: PhysicalPlan) -> PhysicalPlan:
        seen, pending = set(), [plan.dag]
        while pending:
            op = pending.pop()
            if id(op) in seen:
                continue
            seen.add(id(op))
            pending.extend(op.input_dependencies)
            rows = self._batch_size(op)
            if rows:
                last = op.get_map_transformer().get_transform_fns()[-1]
                size = last.output_block_size_option
                last._output_block_size_option = OutputBlockSizeOption(
                    target_max_block_size=size.target_max_block_size if size is not None else None,
                    target_num_rows_per_block=rows)
        return plan

    def _batch_size(self, op) -> int | None:
        if not isinstance(op, MapOperator):
            return None
        logical = getattr(op, "_logical_operators", [])
        if not logical or not isinstance(logical[-1], MapBatches) or logical[-1].fn not in self.udfs:
            return None
        batch = logical[-1].batch_size
        return batch if isinstance(batch, int) and batch > 0 else None

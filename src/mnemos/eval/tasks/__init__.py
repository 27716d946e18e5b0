"""The evaluation tasks, one module each, registered here in the order the report shows them.

To add a task: write ``<name>.py`` with an :class:`~mnemos.eval.registry.EvalTask` (or
:class:`~mnemos.eval.runner.GenerationTask`) and add it to the registration below; the harness, ``mnemos eval
<name>`` and the report then know it.
"""

from mnemos.eval.registry import TASKS, EvalTask, register_task
from mnemos.eval.tasks.babilong import BABILONG
from mnemos.eval.tasks.capacity import CAPACITY
from mnemos.eval.tasks.lm import LM
from mnemos.eval.tasks.mqar import MQAR
from mnemos.eval.tasks.niah import NIAH

__all__ = ["TASKS", "EvalTask", "MQAR", "NIAH", "BABILONG", "CAPACITY", "LM"]

for _task in (MQAR, NIAH, BABILONG, CAPACITY, LM):
    register_task(_task)

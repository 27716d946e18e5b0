"""Evaluation: the benchmark harness (``evaluate``), model adapters, results, reports and plots."""

from mnemos.eval.adapters import HFCausalLMAdapter, MnemosLMAdapter, build_mnemos_model, load_mnemos_checkpoint, load_model
from mnemos.eval.reference_models import InductionLM, RandomBigramLM
from mnemos.eval.harness import EvalOptions, config_from_dict, config_to_dict, evaluate, run_eval
from mnemos.eval.report import merge_results, report, write_report
from mnemos.eval.results import Cell, EvalResults
from mnemos.eval.stateful import StatefulLM, state_size
from mnemos.eval.tables import capacity_summary, markdown_report

__all__ = [
    "Cell",
    "EvalOptions",
    "EvalResults",
    "HFCausalLMAdapter",
    "InductionLM",
    "MnemosLMAdapter",
    "RandomBigramLM",
    "StatefulLM",
    "build_mnemos_model",
    "capacity_summary",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "load_mnemos_checkpoint",
    "load_model",
    "markdown_report",
    "merge_results",
    "report",
    "run_eval",
    "state_size",
    "write_report",
]

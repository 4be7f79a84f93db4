"""Runs of the scripts with vLLM for tests/test_vllm.py, each in its own process: vLLM's CPU backend binds
the threads of the process it runs in, which must not be pytest's.

    python tests/vllm_runs.py train RECORD.json [--no_sync] -- <train_grpo.py arguments>
    python tests/vllm_runs.py evaluate RECORD.json -- <evaluate.py arguments>
    python tests/vllm_runs.py filter RECORD.json -- <filter_data.py arguments>
    python tests/vllm_runs.py evaluate A.json -- <arguments> --then filter B.json -- <arguments>

Runs joined by `--then` share one process and pay its start (importing vLLM, about 10 s) once.

Training runs start vLLM in eager mode: no torch.compile warm-up (about a minute per new model shape on
CPU). Evaluation and filtering keep the warm-up: their seeded requests fail in eager mode on CPU ('CPU
Generator does not use offset'). `train` records, per vLLM call, the sampling settings vLLM was given, and, per generation batch, the
importance-sampling ratios of rescued rows before and after the repair gives them their group's ratio, and
the rows substitution copied with their ratios.
"""

import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def start_vllm_eagerly():
    import data  # noqa: F401  (first: it quiets bitsandbytes, which vLLM imports)
    import vllm
    import trl.generation.vllm_generation as trl_vllm

    eager = functools.partial(vllm.LLM, enforce_eager=True)
    vllm.LLM = trl_vllm.LLM = eager


def recording_trainer(record: dict, sync: bool):
    import torch

    import train_grpo
    from batch_repair import row_sources

    class RecordingTrainer(train_grpo.PolarisGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            vllm_generation = self.vllm_generation
            if not sync:  # the control: vLLM keeps the weights it started with
                vllm_generation.sync_weights = lambda: None
            generate = vllm_generation.generate

            def recorded_generate(*args, **kwargs):
                result = generate(*args, **kwargs)
                record["vllm_calls"].append({
                    "step": self.state.global_step,
                    "temperature": vllm_generation.temperature,
                    "max_tokens": vllm_generation.max_completion_length,
                    "longest_completion": max(len(ids) for ids in result[1]),
                    "trainer_temperature": self.temperature,
                    "adapter": getattr(getattr(self.vllm_adapter_sync, "request", None), "lora_name", None),
                })
                return result

            vllm_generation.generate = recorded_generate

        def _align_rescued_ratios(self, output):
            ratio = output["importance_sampling_ratio"]
            before = ratio.detach().clone()
            super()._align_rescued_ratios(output)
            mask = output["completion_mask"].float()
            record["rescues"].append({
                "rows": list(self._rescued_rows),
                "num_generations": self.num_generations,
                "ratio_before": before.tolist(),
                "ratio_after": ratio.tolist(),
                "mask": mask.tolist(),
            })

        def _assemble_batch(self, batches, plan):
            output = super()._assemble_batch(batches, plan)
            pool = torch.cat([batch.output["importance_sampling_ratio"] for batch in batches])
            sources = row_sources(plan.group_sources, self.num_generations)
            record["substitutions"].append({
                "sources": sources.tolist(),
                "pool_ratio": pool.tolist(),
                "ratio": output["importance_sampling_ratio"].tolist(),
            })
            return output

    return RecordingTrainer


def run_script(argv: list[str]):
    """One run: `command RECORD.json [options] -- <script arguments>`."""
    command, record_path = argv[0], Path(argv[1])
    options = argv[2 : argv.index("--")]
    script_args = argv[argv.index("--") + 1 :]
    record = {"vllm_calls": [], "rescues": [], "substitutions": []}
    if command == "train":
        import train_grpo

        start_vllm_eagerly()
        trainer_class = recording_trainer(record, sync="--no_sync" not in options)
        record["summary"] = train_grpo.main(*train_grpo.parse_args(script_args), trainer_class=trainer_class)
    elif command == "evaluate":
        import evaluate

        record["summary"] = evaluate.main(evaluate.parse_args(script_args))
    elif command == "filter":
        import filter_data

        record["summary"] = filter_data.main(filter_data.parse_args(script_args))
    record_path.write_text(json.dumps(record, default=str))


def main(argv: list[str]):
    while "--then" in argv:
        run_script(argv[: argv.index("--then")])
        argv = argv[argv.index("--then") + 1 :]
    run_script(argv)


if __name__ == "__main__":
    main(sys.argv[1:])

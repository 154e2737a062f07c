"""Continuous batching for OpenVINO artifacts: openvino-genai's ``ContinuousBatchingPipeline``.

Every admitted job becomes a request of the pipeline at once; each ``step()`` advances all of them
together (new prompts are prefilled while older ones decode), and a job's tokens are handed on as
soon as a step produces them. The pipeline gets token ids, never text, so it applies no chat
template of its own (llmopt applied the artifact's already), and it is opened with the scheduler
options the artifact's runner uses (prefix caching off unless the artifact says otherwise).
"""

from __future__ import annotations

import numpy as np

from llmopt.serve.engine import Engine, Job

# Properties that only openvino-genai's LLMPipeline reads; the pipeline's compile step refuses them.
LLM_PIPELINE_ONLY = ("ATTENTION_BACKEND",)


def supports(runner) -> bool:
    """A dynamic-shape OpenVINO artifact whose attention runs on the paged-attention scheduler."""
    options = getattr(runner, "ov_config", None)
    if runner.target != "openvino" or options is None or not hasattr(runner, "_scheduler_config"):
        return False
    return str(options.get("ATTENTION_BACKEND", "PA")).upper() != "SDPA"


class ContinuousEngine(Engine):
    kind = "continuous-batching"

    def __init__(self, runner, capacity: int):
        genai = runner.genai
        properties = {key: value for key, value in runner.ov_config.items() if key not in LLM_PIPELINE_ONLY}
        self.pipeline = genai.ContinuousBatchingPipeline(str(runner.path), runner._scheduler_config(), runner.device,
                                                          properties)
        self._incoming: list[Job] = []
        self._active: dict[int, tuple[Job, object]] = {}
        super().__init__(runner, capacity)

    def _enqueue(self, job: Job) -> None:
        self._incoming.append(job)

    def _drain_all(self) -> list[Job]:
        with self._lock:
            jobs, self._incoming = self._incoming, []
        jobs += [job for job, _ in self._active.values()]
        self._active.clear()
        return jobs

    def _serve(self) -> None:
        runner, status = self.runner, self.runner.genai.GenerationStatus
        while True:
            with self._lock:
                while not self._incoming and not self._active and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._incoming and not self._active:
                    return
                new, self._incoming = self._incoming, []
            for job in new:
                if job.cancelled:
                    continue
                config = runner._generation_config(job.sampling, job.sampling.max_new_tokens)
                ids = runner.ov.Tensor(np.asarray([job.prompt_ids], dtype=np.int64))
                self._active[job.id] = (job, self.pipeline.add_request(job.id, ids, config))
            if self.pipeline.has_non_finished_requests():
                self.pipeline.step()
            for job_id, (job, handle) in list(self._active.items()):
                ended = "length"
                if not job.done and handle.can_read():
                    for output in handle.read().values():
                        for token in output.generated_ids:
                            job.push(int(token))
                        if str(output.finish_reason).upper().endswith("STOP"):
                            ended = "stop"  # an end token the pipeline may not hand back
                running = handle.get_status() == status.RUNNING
                if job.done and running:
                    handle.cancel()  # finished by a stop string, or its client went away: free its KV blocks
                if job.done or not running:
                    job.finish(ended)  # no-op unless the pipeline ended it itself
                    del self._active[job_id]
                    self.release(job)

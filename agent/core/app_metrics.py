"""Facts about the application metrics that inference servers and training jobs export, which the
twin (which serves vLLM's) and the throughput join (which reads them from Prometheus) must agree
on: metric names, their kinds and units, the labels the servers put on them.

Every server exports a throughput counter (or a histogram whose `_sum` counts the same thing) and,
where it has them, latency histograms for the time to the first token (TTFT) and the time per
output token (TPOT). Names, per server, as their documentation gives them:

- vLLM (docs.vllm.ai "Production Metrics", v0.5-v0.9): `vllm:generation_tokens_total` and
  `vllm:prompt_tokens_total` (counters), `vllm:time_to_first_token_seconds` and
  `vllm:time_per_output_token_seconds` (histograms, seconds); label `model_name` (and `engine`
  in the V1 engine). Later releases call TPOT `vllm:inter_token_latency_seconds`: the name is a
  setting.
- Hugging Face TGI (huggingface.co/docs/text-generation-inference/reference/metrics):
  `tgi_request_generated_tokens` (a histogram of tokens per request: its `_sum` counts generated
  tokens) and `tgi_request_mean_time_per_token_duration` (histogram, seconds); TGI exports no
  time-to-first-token histogram and no model label (one model per server).
- Triton with the TensorRT-LLM backend (triton-inference-server/tensorrtllm_backend metrics):
  `nv_llm_output_token_len` (a histogram, `_sum` counts output tokens) and Triton's own
  `nv_inference_first_response_histogram_ms` (decoupled models, milliseconds); labels `model`,
  `version`. Triton has no time-per-output-token histogram.
- NVIDIA Dynamo's frontend (docs.nvidia.com/dynamo, Metrics Catalog):
  `dynamo_frontend_output_tokens_total` (counter), `dynamo_frontend_time_to_first_token_seconds`
  and `dynamo_frontend_inter_token_latency_seconds` (histograms, seconds); label `model`.
- Training: ooda's own documented metric, `ooda_training_steps_total`, a counter of optimizer
  steps a job exports (prometheus-client: `Counter("ooda_training_steps", ...)`), labelled with
  its job the way its scrape target is (docs/throughput.md).

None of them names the scheduler's job: the mapping to jobs is a label the scrape configuration
adds to the target (a static or file_sd label, a Kubernetes pod label relabelled), configured per
source (`job_label`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ThroughputKind(StrEnum):
    """Where a job's throughput comes from: an application's own metric, or the proxy."""

    VLLM = "vllm"
    TGI = "tgi"
    TRITON = "triton"
    DYNAMO = "dynamo"
    TRAINING = "training"
    SM_CLOCK = "sm_clock"  # the fallback: the SM clock relative to the job's uncapped clock


APPLICATION_KINDS = tuple(k for k in ThroughputKind if k is not ThroughputKind.SM_CLOCK)

# What a token-generating server's throughput counts (tokens per joule is defined on it).
TOKENS_UNIT = "tokens"

# Per GPU, in Snapshot.labels: which throughput is in use and its unit.
THROUGHPUT_KIND_LABEL = "throughput_source"
THROUGHPUT_UNIT_LABEL = "throughput_unit"


@dataclass(frozen=True, slots=True)
class ServerMetrics:
    """One server's metric names. `rate` is a counter, or a histogram's `_sum` series (rated
    alike); the latency histograms are given by their base name ("" where the server has none),
    with the factor that turns their unit into seconds."""

    rate: str
    unit: str  # what `rate` counts: "tokens" or "steps"
    ttft: str = ""
    tpot: str = ""
    latency_to_s: float = 1.0


SERVERS: dict[ThroughputKind, ServerMetrics] = {
    ThroughputKind.VLLM: ServerMetrics(
        rate="vllm:generation_tokens_total",
        unit=TOKENS_UNIT,
        ttft="vllm:time_to_first_token_seconds",
        tpot="vllm:time_per_output_token_seconds",
    ),
    ThroughputKind.TGI: ServerMetrics(
        rate="tgi_request_generated_tokens_sum",
        unit=TOKENS_UNIT,
        tpot="tgi_request_mean_time_per_token_duration",
    ),
    ThroughputKind.TRITON: ServerMetrics(
        rate="nv_llm_output_token_len_sum",
        unit=TOKENS_UNIT,
        ttft="nv_inference_first_response_histogram_ms",
        latency_to_s=1e-3,
    ),
    ThroughputKind.DYNAMO: ServerMetrics(
        rate="dynamo_frontend_output_tokens_total",
        unit=TOKENS_UNIT,
        ttft="dynamo_frontend_time_to_first_token_seconds",
        tpot="dynamo_frontend_inter_token_latency_seconds",
    ),
    ThroughputKind.TRAINING: ServerMetrics(rate="ooda_training_steps_total", unit="steps"),
}

# vLLM's other counter, served by the twin too (prefill work: what TTFT pays for).
VLLM_PROMPT_TOKENS = "vllm:prompt_tokens_total"
# vLLM's latency buckets (vllm/engine/metrics.py): TTFT and TPOT, in seconds.
VLLM_TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
VLLM_TPOT_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip

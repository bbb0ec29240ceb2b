"""Wire fixtures written for these tests, modelled on what real TGI servers send."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

# /info of TGI 2.0.x: max_input_length, model_dtype, no router.
INFO_2_0: Dict[str, Any] = {
    "model_id": "meta-llama/Meta-Llama-3-70B-Instruct",
    "model_sha": None,
    "model_dtype": "torch.float16",
    "model_device_type": "cuda",
    "model_pipeline_tag": None,
    "max_concurrent_requests": 128,
    "max_best_of": 2,
    "max_stop_sequences": 4,
    "max_input_length": 8191,
    "max_total_tokens": 8192,
    "waiting_served_ratio": 0.3,
    "max_batch_total_tokens": 1259392,
    "max_waiting_tokens": 20,
    "max_batch_size": None,
    "validation_workers": 32,
    "max_client_batch_size": 4,
    "version": "2.0.2",
    "sha": "dccab72549635c7eb5ddb17f43f0b7cdff07c214",
    "docker_label": "sha-dccab72",
}

# /info of TGI 2.1/2.2: renamed max_input_tokens, dtype fields still there.
INFO_2_2: Dict[str, Any] = {
    **{k: v for k, v in INFO_2_0.items() if k != "max_input_length"},
    "max_input_tokens": 4095,
    "max_total_tokens": 4096,
    "router": "text-generation-router",
    "version": "2.2.0",
    "sha": "db7e043ded45e14ed24188d5a963911c96049618",
    "docker_label": None,
}

# /info of TGI 3.x: the dtype/batch fields are gone.
INFO_3: Dict[str, Any] = {
    "model_id": "meta-llama/Llama-3.1-8B-Instruct",
    "model_sha": "0e9e39f249a16976918f6564b8830bc894c89659",
    "model_pipeline_tag": "text-generation",
    "max_concurrent_requests": 128,
    "max_best_of": 2,
    "max_stop_sequences": 4,
    "max_input_tokens": 8191,
    "max_total_tokens": 8192,
    "validation_workers": 2,
    "max_client_batch_size": 4,
    "router": "text-generation-router",
    "version": "3.3.6",
    "sha": "1a2b3c4d5e6f708192a3b4c5d6e7f80912a3b4c5",
    "docker_label": "sha-1a2b3c4",
}

METRICS_TEXT = """# TYPE tgi_request_count counter
tgi_request_count 21
# TYPE tgi_request_failure counter
tgi_request_failure{err="validation"} 2
tgi_request_failure{err="dropped"} 1
# TYPE tgi_queue_size gauge
tgi_queue_size 3
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 5
# TYPE tgi_request_duration histogram
tgi_request_duration_bucket{le="0.00015"} 0
tgi_request_duration_bucket{le="+Inf"} 21
tgi_request_duration_sum 12.5
tgi_request_duration_count 21
# TYPE tgi_request_skipped_tokens summary
tgi_request_skipped_tokens{quantile="0.5"} 0
tgi_request_skipped_tokens_sum 0
tgi_request_skipped_tokens_count 21
"""


def native_frames(
    texts: List[str],
    *,
    era: str = "3",
    finish: str = "length",
    seed: Optional[int] = None,
    input_length: int = 5,
    special_last: bool = False,
) -> bytes:
    """A /generate_stream body as TGI of ``era`` ("0.9", "2.0" or "3") writes it."""
    space = b" " if era == "3" else b""
    out = []
    generated = ""
    for n, text in enumerate(texts):
        last = n == len(texts) - 1
        special = special_last and last
        if not special:
            generated += text
        frame: Dict[str, Any] = {}
        if era != "0.9":
            frame["index"] = n + 1
        frame["token"] = {"id": 100 + n, "text": text, "logprob": -0.25, "special": special}
        frame["generated_text"] = generated if last else None
        details: Optional[Dict[str, Any]] = None
        if last:
            details = {"finish_reason": finish, "generated_tokens": len(texts), "seed": seed}
            if era == "3":
                details["input_length"] = input_length
        frame["details"] = details
        out.append(b"data:" + space + json.dumps(frame, separators=(",", ":")).encode() + b"\n\n")
    return b"".join(out)


def error_frame(error: str, error_type: str, era: str = "3") -> bytes:
    space = b" " if era == "3" else b""
    body = json.dumps({"error": error, "error_type": error_type}, separators=(",", ":")).encode()
    return b"data:" + space + body + b"\n\n"

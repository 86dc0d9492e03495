"""mdsd.testing decoder-level audits (audit_decoder): the engine passes, a naive decoder with the
sibling rule fails, wrong output lengths are reported.

Every audit here has a family-wise false-positive rate <= 1e-4 (Bonferroni over its cases), so a
"passes" assertion fails spuriously with probability <= 1e-4 for a given seed -- and the seeds
are fixed, so the outcome is stable.
"""

from __future__ import annotations

import pytest

from mdsd.testing import faulty


@pytest.mark.slow
def test_decoder_audit_engine_passes_naive_faulty_fails(one_thread):
    from mdsd.testing import audit_decoder, engine_generate_fn, naive_generate_fn

    engine = audit_decoder(engine_generate_fn("2,1", "without_replacement"), runs=300)
    assert engine.passed, engine.summary()
    # one new token: 8 cells, where the sibling rule is off by 0.147 in total variation
    bad = audit_decoder(naive_generate_fn(faulty.sibling_same_residual, "iid", 2), runs=300, max_new_tokens=1)
    assert not bad.passed and bad.worst.kind == "decoder"


def test_decoder_audit_reports_wrong_length(one_thread):
    from mdsd.testing import audit_decoder

    def with_prompt(target, draft, input_ids, k, temperature, seed):
        return input_ids[0].tolist() + [0] * k

    result = audit_decoder(with_prompt, runs=5)
    assert result.status == "error" and "not the prompt" in result.error

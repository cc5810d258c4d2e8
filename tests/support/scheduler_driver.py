"""Drive the scheduler as the engine does, without a model: update, then the engine's end rule on the tokens."""

from packserve.engine.stop import token_finish


def update(s, out, sampled: dict[str, int]):
    """Scheduler.update, then finish what the new tokens end (OutputProcessor.on_token, without stop strings)."""
    changed = s.update(out, sampled)
    for req in changed:
        reason, stop = token_finish(req, s.config.max_model_len)
        if reason is not None:
            s.finish(req.request_id, reason, stop)
    return changed

"""The web page's rank mode, over the run's preference store (DIR/prefs.sqlite):
``POST /api/samples`` (K answers to one prompt, stored unranked), ``POST /api/rankings`` (a
person's order over them, best first) and ``GET /api/prefs`` (how much the store holds)."""

import asyncio

from fastapi import APIRouter, Request

from echolm.annotator import SIMULATED, is_simulated_name
from echolm.errors import EchoError
from echolm.prefs import PreferenceStore
from echolm.serve.batcher import RowParams
from echolm.serve.errors import APIError, error_responses
from echolm.serve.jobs import Server, row_seed
from echolm.serve.schemas import PrefCounts, RankingRequest, RankingResult, SampleResult


def ranking_routes(srv: Server, sample_request: type, guard: list,
                   auth_errors: tuple[int, ...]) -> APIRouter:
    """The routes, for server `srv`: its /api/samples request model (built for its limits)
    and `guard`, the API-key dependency if any. Store calls run in a worker thread (SQLite
    may wait for another writer)."""
    router = APIRouter()
    path = srv.run_dir / "prefs.sqlite"

    @router.post("/api/samples", response_model=SampleResult, dependencies=guard,
                 tags=["echo"], responses=error_responses(400, *auth_errors, 404, 413, 429,
                                                          500, 503),
                 summary="K answers to one prompt, stored (unranked) in DIR/prefs.sqlite")
    async def samples(body: sample_request, request: Request) -> dict:
        stage, model, ckpt = await srv.resolve(body.model)
        prompt = srv.tok.render_user(body.prompt)
        srv.check_prompt(prompt, model, "prompt")
        max_new = srv.max_new(body.max_tokens, srv.limits.max_tokens, len(prompt), model)
        params = [RowParams(max_new=max_new, temperature=body.temperature, top_p=body.top_p,
                            seed=row_seed(body.seed, i)) for i in range(body.n)]
        job = srv.submit(model, [prompt] * body.n, params)
        try:
            rows = await job.collect(request)
        finally:
            job.close()
        texts = ["".join(rows[i]["text"]) for i in range(body.n)]
        sampling = {"temperature": body.temperature, "top_p": body.top_p,
                    "max_tokens": max_new, "seed": body.seed, "model": body.model}

        def store() -> tuple[int, list[int]]:
            with PreferenceStore(path) as db:
                pid = db.add_prompt(body.prompt, source="serve")
                return pid, db.add_responses(pid, texts, stage=stage, checkpoint=ckpt,
                                             sampling=sampling)

        pid, ids = await asyncio.to_thread(store)
        return {"prompt_id": pid, "prompt": body.prompt, "model": body.model, "stage": stage,
                "checkpoint": ckpt, "sampling": sampling,
                "responses": [{"id": rid, "text": t, "finish_reason": rows[i]["finish"]}
                              for i, (rid, t) in enumerate(zip(ids, texts, strict=True))]}

    @router.post("/api/rankings", response_model=RankingResult, dependencies=guard,
                 tags=["echo"], responses=error_responses(400, *auth_errors, 413),
                 summary="store a person's order over sampled answers (best first)")
    async def rankings(body: RankingRequest) -> dict:
        who = body.annotator.strip()
        if is_simulated_name(who):  # its rankings must stay its own: they are labelled so
            raise APIError(400, f"annotator: {who[:100]!r} is reserved: names starting with "
                           f"'{SIMULATED}' belong to the simulated annotator (`echolm rank "
                           "--simulated`); choose another name", param="annotator",
                           code="reserved_annotator")

        def store() -> tuple[int, dict]:
            with PreferenceStore(path) as db:
                rid = db.add_ranking(body.prompt_id, body.response_ids, who)
                return rid, db.counts()

        try:
            rid, counts = await asyncio.to_thread(store)
        except EchoError as e:
            raise APIError(400, str(e), param="response_ids", code="invalid_ranking") from None
        return {"ranking_id": rid, "counts": counts}

    @router.get("/api/prefs", response_model=PrefCounts, dependencies=guard, tags=["echo"],
                responses=error_responses(*auth_errors),
                summary="how much the preference store holds")
    async def prefs() -> dict:
        if not path.exists():
            return {"path": str(path), "counts": {"prompts": 0, "responses": 0, "rankings": 0}}

        def count() -> dict:
            with PreferenceStore(path) as db:
                return db.counts()

        return {"path": str(path), "counts": await asyncio.to_thread(count)}

    return router

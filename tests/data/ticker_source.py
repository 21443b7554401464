"""A third-party source for the tests: pops one call at start, and one per POST to its webhook."""

from aiohttp import web

from spop_cli import hookimpl
from spop_cli.sources import Source, SourceError


class Ticker(Source):
    def __init__(self, options):
        unknown = set(options) - {"resource", "contact_id"}
        if unknown:
            raise SourceError("unknown key", sorted(unknown)[0])
        if not isinstance(options.get("resource", "13579"), str):
            raise SourceError("must be a string", "resource")
        self.resource = options.get("resource", "13579")
        self.contact_id = options.get("contact_id", "ticker-start")

    async def run(self, ctx):
        await ctx.sink.send(call(self.contact_id, self.resource, "at start"))
        await ctx.stop.wait()

    def routes(self, ctx):
        async def hook(request):
            body = await request.json()
            answer = await ctx.sink.send(call(body["contact_id"], body["resource"], "webhook"))
            return web.json_response(answer)

        return [web.post(f"/v1/sources/{ctx.name}/hook", hook)]

    async def check(self, ctx, out):
        out(f"ticker would pop {self.resource}")
        return self.resource != "fail"


def call(contact_id, resource, description):
    return [
        {
            "contact_id": contact_id,
            "event": "queued",
            "media": "telephone",
            "source": "12345",
            "destination": "2468",
            "queue_name": "Ventes",
            "contact_description": description,
        },
        {"contact_id": contact_id, "event": "routed", "resource": resource},
    ]


@hookimpl
def register_sources(register):
    register("ticker", Ticker, "pops a call at start and one per webhook POST")

"""The handler that ``python -m taskhub.client worker jobs:send_bulk --action mail:send-bulk`` runs."""

import asyncio


async def send_bulk(task):
    await task.pickup()  # tell the hub to wait for us
    emails = await task.get_payload()
    for i, email in enumerate(emails):
        await asyncio.sleep(0.1)  # send it
        await task.update({"sent": i + 1}, progress=(i + 1) / len(emails))
    return {"sent": len(emails)}

"""A handler that needs a heavy set of standard-library modules."""
import asyncio
import decimal
import email.message
import http.client
import json
import xml.etree.ElementTree as ET


def handler(event):
    msg = email.message.EmailMessage()
    msg["Subject"] = "hi %s" % event.get("name", "world")
    total = decimal.Decimal("1.10") + decimal.Decimal("2.20")
    root = ET.fromstring("<a><b>%s</b></a>" % total)
    return json.dumps({"subject": msg["Subject"], "sum": root.find("b").text,
                       "status": http.client.responses[200],
                       "loop": asyncio.iscoroutinefunction(handler)})

"""Requests that the OpenAI tests send both straight into the service and through the platform."""

QUESTION = [{"role": "user", "content": "Kaj je vredno videti v Ljubljani?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "mesto": {"type": "string", "enum": ["Ljubljana", "Maribor", "Celje"]},
        "prebivalci": {"type": "integer"},
    },
    "required": ["mesto", "prebivalci"],
    "additionalProperties": False,
}

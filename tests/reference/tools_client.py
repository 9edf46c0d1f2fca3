"""Tool calls and structured output as programs use them, through packages that are not ours:
the `openai` package's tool round trip (a call, the tool's result, the final answer), streamed
calls put together from their deltas, and LangChain's `with_structured_output` on a Pydantic
model with nested objects, lists and enums (by JSON schema and by function calling). Every
call's arguments are checked with the `jsonschema` package. Prints what it saw as one JSON
object; any exception fails the test that runs it.

Usage: tools_client.py BASE_URL   (e.g. http://127.0.0.1:8080/v1)
"""
import enum
import json
import sys
from typing import Annotated, List, Optional

import jsonschema
import openai
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

BASE = sys.argv[1]
client = openai.OpenAI(base_url=BASE, api_key="unused-on-loopback", max_retries=0, timeout=120)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}}, "required": ["timezone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
seen = {}


def checked(name, arguments):
    """A call's arguments: JSON that its tool's schema accepts."""
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


# The round trip: the model must call (required); the tool's result goes back with role "tool";
# the final answer is text.
question = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model="any", messages=question, tools=TOOLS, tool_choice="required",
                                   max_tokens=60, temperature=0)
choice = r.choices[0]
call = choice.message.tool_calls[0]
seen["required"] = {"finish_reason": choice.finish_reason, "name": call.function.name, "id": call.id,
                    "arguments": checked(call.function.name, call.function.arguments),
                    "calls": len(choice.message.tool_calls), "type": call.type}
history = question + [
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": call.id, "type": "function",
                     "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
]
r = client.chat.completions.create(model="any", messages=history, tools=TOOLS, tool_choice="none",
                                   max_tokens=40, temperature=0)
seen["final"] = {"finish_reason": r.choices[0].finish_reason, "text": r.choices[0].message.content,
                 "tool_calls": r.choices[0].message.tool_calls}

# A named function, streamed: the call put together from its deltas as the package's users do.
calls, finish, content = {}, None, ""
for chunk in client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What time is it in Tokyo?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=60, temperature=0,
        stream=True):
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta
    content += delta.content or ""
    for d in delta.tool_calls or []:
        c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
        c["id"] = d.id or c["id"]
        c["name"] += d.function.name or ""
        c["arguments"] += d.function.arguments or ""
    finish = chunk.choices[0].finish_reason or finish
seen["named_stream"] = {"finish_reason": finish, "content": content, "calls": len(calls),
                        "name": calls[0]["name"], "id": calls[0]["id"],
                        "arguments": checked(calls[0]["name"], calls[0]["arguments"])}

# Auto: the model chooses; whatever it chose must be whole and agree with finish_reason.
auto = []
for q in ["What is the weather in Rome?", "Say hello."]:
    r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": q}], tools=TOOLS,
                                       max_tokens=60, temperature=0)
    m = r.choices[0].message
    if m.tool_calls:
        for c in m.tool_calls:
            checked(c.function.name, c.function.arguments)
        auto.append({"finish_reason": r.choices[0].finish_reason, "called": m.tool_calls[0].function.name})
    else:
        auto.append({"finish_reason": r.choices[0].finish_reason, "text": m.content})
seen["auto"] = auto

# A tool the request does not offer cannot be named.
try:
    client.chat.completions.create(model="any", messages=question, tools=TOOLS, max_tokens=5,
                                   tool_choice={"type": "function", "function": {"name": "launch"}})
    seen["unknown_tool"] = "accepted"
except openai.BadRequestError as e:
    seen["unknown_tool"] = {"status": e.status_code, "message": str(e)}


# LangChain: a Pydantic model with a nested object, lists and enums, both ways LangChain asks.
class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=150)
    favourite: Color
    address: Address
    hobbies: List[Annotated[str, Field(max_length=30)]] = Field(max_length=3)
    nickname: Optional[str] = Field(default=None, max_length=20)


llm = ChatOpenAI(base_url=BASE, api_key="unused-on-loopback", model="any", temperature=0, max_tokens=200,
                 max_retries=0, timeout=120)
for method in ["json_schema", "function_calling"]:
    person = llm.with_structured_output(Person, method=method).invoke("Describe a person who lives in Paris.")
    assert isinstance(person, Person), type(person)
    seen[f"langchain_{method}"] = json.loads(person.model_dump_json())

print(json.dumps(seen))

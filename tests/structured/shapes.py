"""Pydantic models the structured-output tests ask both models for, each exercising a part of JSON
Schema the SDK writes: nested objects, arrays (of strings, of objects), enums (string and integer),
Optional fields, literals, booleans and numbers with bounds. Strings and arrays are bounded, as a
user of a small model would bound them (unbounded ones let a 135M model ramble until max_tokens)."""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field

Short = Field(min_length=1, max_length=24)
Word = Annotated[str, Field(min_length=1, max_length=16)]


class Colour(StrEnum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Priority(IntEnum):
    LOW = 1
    MEDIUM = 2
    HIGH = 3


class Person(BaseModel):
    name: str = Short
    age: int = Field(ge=0, le=120)
    favourite_colour: Colour


class Point(BaseModel):
    x: float = Field(ge=-10, le=10)
    y: float = Field(ge=-10, le=10)


class Address(BaseModel):
    street: str = Short
    city: str = Short


class Contact(BaseModel):
    name: str = Short
    address: Address


class Tagged(BaseModel):
    title: str = Short
    tags: list[Word] = Field(min_length=1, max_length=3)


class Item(BaseModel):
    name: str = Short
    quantity: int = Field(ge=1, le=10)


class Order(BaseModel):
    items: list[Item] = Field(min_length=1, max_length=3)
    paid: bool


class Book(BaseModel):
    title: str = Short
    subtitle: str | None = Field(default=None, max_length=24)
    year: int | None = Field(default=None, ge=1000, le=2100)


class Verdict(BaseModel):
    answer: Literal["yes", "no", "maybe"]
    confidence: float = Field(ge=0, le=1)


class Task(BaseModel):
    title: str = Short
    priority: Priority
    done: bool


class Weather(BaseModel):
    city: str = Short
    temperature_c: int = Field(ge=-50, le=60)
    conditions: Literal["sunny", "cloudy", "rain", "snow"]


class Team(BaseModel):
    name: str = Short
    lead: Person
    members: list[Word] = Field(min_length=1, max_length=3)


class Rectangle(BaseModel):
    corners: list[Point] = Field(min_length=2, max_length=2)
    filled: bool
    colour: Colour | None


# What each is asked for, in a user's words.
SHAPES: dict[type[BaseModel], str] = {
    Person: "Describe a person.",
    Point: "Give a point on a plane.",
    Contact: "Give a contact with a postal address.",
    Tagged: "Give a blog post title with tags.",
    Order: "Give a small shopping order.",
    Book: "Name a book.",
    Verdict: "Is the sky blue?",
    Task: "Give a task from a to-do list.",
    Weather: "Report the weather in a city.",
    Team: "Describe a small team.",
    Rectangle: "Describe a rectangle by two corners.",
}

"""Shared test data: a few prompt/answer examples with varied prompt and answer lengths."""

from eigenprune.data import Example

EXAMPLES = [
    Example("3 + 4 =", " 7"),
    Example("12 + 30 =", " 42"),
    Example("The premise entails", " the cat sat"),
    Example("Alternative 1: the mat. Alternative 2:", " 1"),
    Example("9 x 9 =", " 81"),
    Example("What was the cause of this?", " is neutral"),
]

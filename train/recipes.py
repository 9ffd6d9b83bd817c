"""The recipes a config can name (``recipe``): one class per name, built by ``make_recipe``.
A registry module of its own, so a recipe's module imports ``recipe.Recipe`` and nothing
imports back."""
from __future__ import annotations

from lens_fast.errors import InvalidValue

from .distill import DistillRecipe
from .recipe import PretrainRecipe, Recipe
from .rl import RLRecipe

RECIPE_CLASSES = {"pretrain": PretrainRecipe, "distill": DistillRecipe, "rl": RLRecipe}


def make_recipe(name: str) -> Recipe:
    """The recipe registered under ``name`` (config ``recipe``)."""
    if name not in RECIPE_CLASSES:
        raise InvalidValue(f"recipe={name!r}: expected one of {list(RECIPE_CLASSES)}")
    return RECIPE_CLASSES[name]()

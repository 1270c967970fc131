"""The shapes world: a procedural visual world every stage of vlkit trains and measures on."""

from vlkit.world.dataset import WorldData, build
from vlkit.world.render import render
from vlkit.world.scene import Scene, WorldConfig, generate_scene

__all__ = ["Scene", "WorldConfig", "WorldData", "build", "generate_scene", "render"]

"""The default QGIS styles for the panels and installations layers (stored in the GeoPackage's
``layer_styles`` table).

Outlines, graduated by area so that small residential arrays and large ground-mounted plants read
differently at a glance; fills are mostly transparent so the imagery stays visible underneath.
Installations are drawn as outlines only (their footprints hold their panels) in blues.
"""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

# (lower m², upper m², outline RGB, label)
AREA_CLASSES = (
    (0.0, 20.0, "255,255,0", "< 20 m²"),
    (20.0, 60.0, "255,170,0", "20 – 60 m²"),
    (60.0, 250.0, "255,85,0", "60 – 250 m²"),
    (250.0, 1.0e12, "230,0,169", "≥ 250 m²"),
)


# installations by footprint area: a home, a large roof, a farm
FOOTPRINT_CLASSES = (
    (0.0, 100.0, "0,200,255", "< 100 m²"),
    (100.0, 2000.0, "0,120,255", "100 – 2,000 m²"),
    (2000.0, 1.0e12, "60,0,200", "≥ 2,000 m²"),
)


def _fill_symbol(name: int, rgb: str, fill_alpha: int = 50) -> str:
    options = {
        "color": f"{rgb},{fill_alpha}",
        "style": "solid",
        "outline_color": f"{rgb},255",
        "outline_style": "solid",
        "outline_width": "0.6",
        "outline_width_unit": "MM",
        "joinstyle": "miter",
    }
    option_xml = "".join(
        f'<Option name={quoteattr(k)} type="QString" value={quoteattr(v)}/>' for k, v in options.items()
    )
    prop_xml = "".join(f"<prop k={quoteattr(k)} v={quoteattr(v)}/>" for k, v in options.items())
    return (
        f'<symbol type="fill" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">'
        f'<layer class="SimpleFill" enabled="1" locked="0" pass="0">'
        f'<Option type="Map">{option_xml}</Option>{prop_xml}'
        f"</layer></symbol>"
    )


def panels_qml(attribute: str = "area_m2") -> str:
    """A QGIS QML document: graduated outline renderer on ``attribute`` plus labels-free display."""
    return _graduated_qml(attribute, AREA_CLASSES, '[% "area_m2" %] m² — score [% "score" %]')


def installations_qml() -> str:
    """The installations layer's style: outlines graduated by footprint area, no fill."""
    return _graduated_qml("footprint_area_m2", FOOTPRINT_CLASSES,
                          '[% "n_panels" %] panels, [% "panel_area_m2" %] m² of panels on [% "footprint_area_m2" %] m²',
                          fill_alpha=0)


def _graduated_qml(attribute: str, classes, map_tip: str, fill_alpha: int = 50) -> str:
    ranges = "".join(
        f'<range lower="{lo}" upper="{hi}" symbol="{i}" label={quoteattr(label)} render="true"/>'
        for i, (lo, hi, _, label) in enumerate(classes)
    )
    symbols = "".join(_fill_symbol(i, rgb, fill_alpha) for i, (_, _, rgb, _) in enumerate(classes))
    return _qml(f'<renderer-v2 type="graduatedSymbol" attr={quoteattr(attribute)} graduatedMethod="GraduatedColor" '
                'symbollevels="0" enableorderby="0" forceraster="0" referencescale="-1">'
                f"<ranges>{ranges}</ranges><symbols>{symbols}</symbols></renderer-v2>", map_tip)


def _qml(renderer: str, map_tip: str) -> str:
    """A QGIS QML document for a polygon layer: ``renderer`` (a ``renderer-v2`` element) and a map tip."""
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="Symbology|Fields|MapTips">'
        f"{renderer}"
        f"<mapTip>{escape(map_tip)}</mapTip>"
        "<layerGeometryType>2</layerGeometryType>"
        "</qgis>\n"
    )


# summary regions by capacity density (kWp per km²): filled, so a map of regions reads as a choropleth
DENSITY_CLASSES = (
    (0.0, 1.0, "255,255,204", "< 1 kWp/km²"),
    (1.0, 100.0, "254,217,118", "1 – 100 kWp/km²"),
    (100.0, 1000.0, "253,141,60", "100 – 1,000 kWp/km²"),
    (1000.0, 10000.0, "227,26,28", "1,000 – 10,000 kWp/km²"),
    (10000.0, 1.0e15, "128,0,38", "≥ 10,000 kWp/km²"),
)
CHANGE_TIP = '[% "change" %]: [% "capacity_kwp_before" %] -> [% "capacity_kwp_after" %] kWp'
CHANGE_COLOURS = {"new": "0,170,0", "removed": "220,0,0", "grown": "0,120,255", "shrunk": "255,140,0",
                  "unchanged": "150,150,150"}


def summary_qml() -> str:
    """The summary layer's style: regions filled by capacity per km²."""
    return _graduated_qml("capacity_kwp_per_km2", DENSITY_CLASSES,
                          '[% "installations" %] installations, [% "capacity_kwp" %] kWp', fill_alpha=160)


def changes_qml() -> str:
    """The changes layer's style: one colour per kind of change."""
    categories = "".join(f'<category value={quoteattr(kind)} symbol="{i}" label={quoteattr(kind)} render="true"/>'
                         for i, kind in enumerate(CHANGE_COLOURS))
    symbols = "".join(_fill_symbol(i, rgb, 90) for i, rgb in enumerate(CHANGE_COLOURS.values()))
    return _qml('<renderer-v2 type="categorizedSymbol" attr="change" symbollevels="0" enableorderby="0" '
                'forceraster="0" referencescale="-1">'
                f"<categories>{categories}</categories><symbols>{symbols}</symbols></renderer-v2>", CHANGE_TIP)

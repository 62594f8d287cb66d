package dev.sessionaffinity.demo;

import java.io.Serializable;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * A shopping cart kept in the HttpSession. The app changes it in place
 * (no setAttribute after the first one), so only a comparison of the
 * serialized session notices the change.
 */
public final class Cart implements Serializable {

    private static final long serialVersionUID = 1L;

    private final Map<String, Line> lines = new LinkedHashMap<>();

    /** Adds quantity of item, changing the nested line in place if it exists (requests may run at once). */
    public synchronized void add(String item, int quantity) {
        lines.computeIfAbsent(item, Line::new).quantity += quantity;
    }

    public synchronized Map<String, Integer> items() {
        Map<String, Integer> items = new LinkedHashMap<>();
        lines.forEach((item, line) -> items.put(item, line.quantity));
        return items;
    }

    /** One line of the cart: a nested Serializable object. */
    static final class Line implements Serializable {
        private static final long serialVersionUID = 1L;

        final String item;
        int quantity;

        Line(String item) {
            this.item = item;
        }
    }
}
